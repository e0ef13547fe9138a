"""Real runtimes for a QuantSim: the ONNX QDQ export (`export`), the runtimes that run it (`onnxruntime`, `openvino`)
behind one interface (`engines`), and where a runtime parts from the simulation (`gap`)."""

RUNTIMES = ("onnxruntime", "openvino")  # deploy targets and simulation engines besides torch
RUNTIME_LABELS = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
# Activation bit widths an exported model holds exactly: ONNX QuantizeLinear's int8 / int16 types saturate at their
# own bounds, so a 4-bit activation grid has no exact QDQ form.
EXPORTABLE_ACT_BITS = (8, 16)
MODES = ("sim", "int8")  # sim: the simulation's float arithmetic; int8: the runtime's integer kernels, as deployed
