#!/usr/bin/env bash
# Every check that needs a GPU, as one run on a machine with one CUDA GPU (16 cores in the figures of results/gpu/).
#
#   GPU_INPUTS=.gpu RESULTS=/tmp/gpu_checks bash scripts/benchmarks/gpu_checks.sh [SECTION ...]   (default: every section)
#
# GPU_INPUTS holds what the run reads, since a GPU machine may not see ../shared:
#   data/cifar10/{test,train}/<class>/   the first 20 images of each class (the quick config's), or for sweep_gpu_full
#                                        the whole test split and the first 52 training images of each class
#   data/imagenet-sample/<wnid>/         some ImageNet JPEGs (replicated to 50,000 by symlinks for the data bench)
#   models/<name>.pt                     the reference checkpoints of $QUICK_MODELS (default: both, as CI's)
#   whl/*.whl                            optional: wheels to install first (Ray, where the machine lacks it)
# Output: each section writes its log to $RESULTS/<section>.log (the sweeps their folders there too) and prints its
# status and last lines to stdout; a failing section is reported and the next one still runs.
set -u
if [[ ${1:-} == -h || ${1:-} == --help ]]; then  # this header, without the comment signs
    sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0" | grep -v '^set -u$'
    exit 0
fi
GPU_INPUTS=${GPU_INPUTS:-.gpu}
RESULTS=${RESULTS:-/tmp/gpu_checks}
DEVICE=${DEVICE:-cuda}
IMAGES=${IMAGES:-50000}        # replicated ImageNet-style images for the data bench
EVAL_IMAGES=${EVAL_IMAGES:-10000}
QUICK_MODELS=${QUICK_MODELS:-resnet18_cifar10 mobilenet_v2_cifar10}
ONLY="$*"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export CLEBENCH_DATA=$GPU_INPUTS/data CLEBENCH_MODELS=$GPU_INPUTS/models CLEBENCH_CACHE=${CLEBENCH_CACHE:-/tmp/clebench-cache}

section() {  # section NAME TIMEOUT_S COMMAND...: run COMMAND with a time limit, its output to $RESULTS/NAME.log
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    [[ -n "$ONLY" && " $ONLY " != *" $name "* ]] && return
    echo "== $name"
    if timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1; then
        echo "   ok in $((SECONDS - started)) s"
    else
        echo "   FAILED (exit $?) after $((SECONDS - started)) s; last lines:"
    fi
    tail -n 25 "$RESULTS/$name.log" | sed 's/^/   | /'
}

if compgen -G "$GPU_INPUTS/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$GPU_INPUTS"/whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
section environment 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc;
    python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.version.cuda,
    torch.backends.cudnn.version(), torch.cuda.get_device_name())"'
section cuda_tests 180 python3 -m pytest -q -p no:cacheprovider tests/test_graph.py tests/test_image_cache.py \
    tests/test_sweep.py -k "cuda or tf32"
read -ra models <<<"$QUICK_MODELS"
quick=(python3 -m clebench sweep configs/cifar10_ci.toml --models "${models[@]}" --device "$DEVICE" --no-progress)
section sweep_gpu 240 "${quick[@]}" --out "$RESULTS/cifar10_ci_gpu"
section sweep_gpu_again 240 "${quick[@]}" --out /tmp/cifar10_ci_gpu_again
section same_rows_gpu 60 python3 scripts/results/same_rows.py "$RESULTS/cifar10_ci_gpu" /tmp/cifar10_ci_gpu_again
section sweep_gpu_ray 300 "${quick[@]}" --ray --gpus-per-task 0.25 --out /tmp/cifar10_ci_gpu_ray
section same_rows_gpu_ray 60 python3 scripts/results/same_rows.py "$RESULTS/cifar10_ci_gpu" /tmp/cifar10_ci_gpu_ray
section sweep_gpu_full 400 python3 -m clebench sweep configs/cifar10.toml --models mobilenet_v2_cifar10 --device "$DEVICE" \
    --no-progress --out "$RESULTS/cifar10_mobilenet_v2_gpu"
section data_256px 300 python3 scripts/benchmarks/bench_data.py --data "$GPU_INPUTS/data/imagenet-sample" --replicate "$IMAGES" \
    --decode-images 4000 --eval mobilenet_v2 --untrained --eval-limit "$EVAL_IMAGES" --device "$DEVICE"
section data_full_size 300 python3 scripts/benchmarks/bench_data.py --data "$GPU_INPUTS/data/imagenet-sample" --full-size \
    --replicate "$IMAGES" --decode-images 4000 --eval resnet18 --untrained --eval-limit "$EVAL_IMAGES" --device "$DEVICE"
for model in mobilenet_v2 resnet18; do
    section "data_sim_$model" 300 python3 scripts/benchmarks/bench_data.py --data "$GPU_INPUTS/data/imagenet-sample" \
        --replicate "$EVAL_IMAGES" --decode-images 1000 --eval "$model" --untrained --quant w8a8_per_tensor_minmax \
        --eval-limit "$EVAL_IMAGES" --device "$DEVICE"
done
section ray_gpu_sharing 240 python3 scripts/benchmarks/bench_ray.py --gpu-sharing-only --markdown "$RESULTS/ray_gpu_sharing.md"
