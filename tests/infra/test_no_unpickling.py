"""Secure default: models, checkpoints and data are never unpickled from storage.

A pickle read from a bucket, a checkpoint directory or an MLflow artifact store runs whatever
code its writer put in it. This scans the platform and the jobs for the calls that unpickle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(REPO / "platform").rglob("*.py"), *(REPO / "jobs").rglob("*.py")])
ALWAYS_PICKLE = {
    "pickle.load",
    "pickle.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "dill.load",
    "dill.loads",
    "joblib.load",
    "torch.serialization.load",
    "mlflow.pytorch.load_model",
    "pd.read_pickle",
    "pandas.read_pickle",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
        for k in call.keywords
    )


def unpickling_calls(source: str) -> list[str]:
    """'line: call' for every call in ``source`` that can unpickle what it reads."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        unsafe = name in ALWAYS_PICKLE
        unsafe |= name == "torch.load" and not _keyword_is(node, "weights_only", True)
        unsafe |= name in ("np.load", "numpy.load") and _keyword_is(node, "allow_pickle", True)
        if unsafe:
            found.append(f"{node.lineno}: {name}")
    return found


def test_the_scan_finds_unpickling_calls():
    snippet = (
        "import pickle, torch, numpy as np\n"
        "pickle.load(open('m.pkl', 'rb'))\n"
        "torch.load('ckpt.pt')\n"
        "torch.load('ckpt.pt', weights_only=False)\n"
        "torch.load('ckpt.pt', weights_only=True)\n"
        "np.load('a.npz', allow_pickle=True)\n"
        "np.load('a.npz')\n"
    )
    assert unpickling_calls(snippet) == [
        "2: pickle.load",
        "3: torch.load",
        "4: torch.load",
        "6: np.load",
    ]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_code_unpickles_from_storage(path):
    assert unpickling_calls(path.read_text()) == []
