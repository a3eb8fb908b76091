"""Nothing in the torch kernels' layer loop waits for the device: no `.item()`,
`.tolist()`, `.cpu()`, `int(tensor)` or tensor built from a host list per layer.

On a GPU each of those stalls the host until the GPU has drained its queue, once per
layer, so the host can no longer queue layer k + 1 while the GPU runs layer k. A step's
inputs reach the device once, before the layers (staging.StepUploader); its one
synchronisation is the sampler's, after them. Checked here on the source (the CPU
cannot tell a sync from a copy), and on a GPU by CUDA's sync debug mode.
"""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

from services.worker.engine import attention, kv_cache, model

# Every function a layer of the torch kernels runs, per step or per layer.
LAYER_LOOP = {
    model: ["LlamaModel.forward_layers", "LlamaModel._layer", "LlamaModel.rope_cos_sin",
            "linear", "silu", "rms_norm", "apply_rope"],
    attention: ["PagedAttention.__call__", "attend", "_pairwise_sum_", "_fold"],
    kv_cache: ["KVCache.workspace"],
}  # fmt: skip

# Calls that copy device memory to the host (or wait for the device), and calls that
# build a device tensor from host values.
SYNCING_METHODS = {"item", "tolist", "cpu", "numpy", "synchronize", "nonzero", "any", "all"}
SYNCING_BUILTINS = {"int", "float", "bool", "print", "int_tensor"}
SYNCING_TORCH = {"tensor", "as_tensor", "from_numpy", "frombuffer"}


def _function(module, qualname: str) -> ast.FunctionDef:
    tree = ast.parse(inspect.getsource(module))
    scope: ast.AST = tree
    for part in qualname.split("."):
        scope = next(
            node
            for node in ast.iter_child_nodes(scope)
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == part
        )
    return scope


def _syncing_calls(function: ast.FunctionDef) -> list[str]:
    found = []
    for node in ast.walk(function):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in SYNCING_BUILTINS:
            found.append(f"{f.id}() at line {node.lineno}")
        elif isinstance(f, ast.Attribute):
            is_torch = isinstance(f.value, ast.Name) and f.value.id == "torch"
            if f.attr in SYNCING_METHODS or (is_torch and f.attr in SYNCING_TORCH):
                found.append(f".{f.attr}() at line {node.lineno}")
            elif f.attr == "to" and any(
                isinstance(a, ast.Constant) and a.value == "cpu" for a in node.args
            ):
                found.append(f".to('cpu') at line {node.lineno}")
    return found


@pytest.mark.parametrize(
    ("module", "qualname"),
    [(m, q) for m, names in LAYER_LOOP.items() for q in names],
    ids=lambda v: v if isinstance(v, str) else v.__name__.rsplit(".", 1)[-1],
)
def test_the_layer_loop_never_syncs_with_the_host(module, qualname):
    assert _syncing_calls(_function(module, qualname)) == []


def test_the_check_finds_what_it_looks_for():
    source = """
def f(x, xs):
    a = x.item() + int(x.sum())
    b = torch.tensor(xs, device=x.device)
    return x.to("cpu"), x.tolist(), b
"""
    calls = _syncing_calls(ast.parse(source).body[0])
    assert sorted(calls) == sorted([
        ".item() at line 3", "int() at line 3", ".tensor() at line 4",
        ".to('cpu') at line 5", ".tolist() at line 5",
    ])  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_on_a_gpu_the_layers_run_with_cuda_sync_debug_mode_erroring():
    from services.worker.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine.from_config(EngineConfig(device="cuda", kernels="torch", num_kv_blocks=64))
    engine.add_request("r", list(range(1, 40)), SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # prefill (and the allocator's first blocks)
    forward = engine.model.forward_layers

    def strict_forward(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return forward(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    engine.model.forward_layers = strict_forward
    while engine.has_unfinished_requests():
        engine.step()
