"""Peer quantization toolkits (AIMET, Brevitas, NNCF) that the sweep runs as steps beside clebench's own.

Each peer is an optional pip extra, imported only when a step or script asks for it: `import_peer` raises a one-line
MissingExtraError naming the extra where it is not installed. The submodules (clebench.peers.aimet,
clebench.peers.brevitas, clebench.peers.nncf) hold what each peer's step runs.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from types import ModuleType

from clebench.errors import MissingExtraError

__all__ = ["PEERS", "import_peer", "peer_version"]

# peer -> (distribution, pip extra, top-level module)
PEERS = {"aimet": ("aimet-torch", "bench", "aimet_torch"), "brevitas": ("brevitas", "brevitas", "brevitas"),
         "nncf": ("nncf", "nncf", "nncf")}


def import_peer(peer: str, module: str) -> ModuleType:
    """Import `module` of `peer` (a key of PEERS), quietly; MissingExtraError naming the extra if it is missing."""
    distribution, extra, _ = PEERS[peer]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # both warn on import about kernels and deprecations they use
            return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(f'{distribution} is not installed: pip install -e ".[{extra}]" '
                                f"(the optional {extra} extra)") from None


def peer_version(peer: str) -> str:
    """The installed version of `peer`'s distribution; MissingExtraError if it cannot be imported."""
    distribution, _, module = PEERS[peer]
    import_peer(peer, module)
    return importlib.metadata.version(distribution)
