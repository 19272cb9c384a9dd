"""PyTorch peer of the TTFT sweep: the same architecture in transformers (SDPA attention), same shapes.

Two timings per (K, L), each to the first token (argmax of the last position's logits):

- `peer_text_ttft_ms`: one forward over K*L + prompt random tokens from an empty cache
  (`use_cache=True`, `logits_to_keep=1`), as the text-concatenation path does.
- `peer_cache_ttft_ms`: the same stack consuming pre-built branch caches: a `DynamicCache` of K*L
  tokens is built once outside the timer (a forward over K*L random tokens); every timed call
  gets a deep copy of it (made outside the timer) and runs the prompt tokens over it. There is no
  re-encoding or mapper here (transformers has none): it is the attention/MLP work of the cache
  path's prefill, i.e. the peer of `cache_prefill_ms` + first token.

Weights are random (transformers' own init, `seed`) unless a state dict is given; bfloat16 on
CUDA, float32 on CPU (dtype="auto"); `attn_implementation="sdpa"`, eval mode,
`torch.inference_mode()`, `torch.cuda.synchronize()` around every timed call on CUDA.

torch and transformers are imported inside functions only: importing this module (and the
whole inference path) never imports torch. `psynth bench ttft --torch-peer` runs the peer in a
child process, in one of two orders (`--peer-order`):
- interleaved (the default): `PeerProcess` starts `python -m benchmarks.peer --serve SPEC`, which
  builds the model and then times one call per request, so the sweep alternates the peer's calls
  with its own at every point and repeat: a slow spell of a shared CPU hits both sides.
- first (the GPU scripts'): `run_peer_subprocess` runs every point in the child
  (`python -m benchmarks.peer SPEC OUT`) BEFORE the JAX sweep starts: JAX reserves most of the
  GPU's memory when its backend starts (XLA_PYTHON_CLIENT_PREALLOCATE), so the peer could not
  fit after it, and the child's exit returns every byte of torch's memory before JAX loads its
  own copy of the weights.
`psynth bench peer` runs the peer alone (no JAX backend in that process) and writes peer.json, for
a driver that times the JAX side in another step (launch/gpu_check.sh).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from benchmarks.harness import Recorder, arch_type, int_list, resolve_arch, say, write_json
from psynth_jax.interop.export import hf_config
from psynth_jax.measure.timing import OutOfMemory, Timing, is_oom, time_once
from psynth_jax.model.config import ModelConfig, RopeScaling

INSTALL_HINT = "pip install torch transformers (or: pip install -e '.[test]')"


class PeerUnavailable(ValueError):
    """torch or transformers is not installed (a ValueError: `psynth` prints it as one clear line)."""


def require_torch() -> None:
    """Raise PeerUnavailable unless torch and transformers can be imported (without importing them)."""
    missing = []
    for name in ("torch", "transformers"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise PeerUnavailable(f"--torch-peer needs PyTorch and transformers; not installed here: "
                              f"{', '.join(missing)} ({INSTALL_HINT})")


def _import_torch():
    try:
        import torch
        import transformers
    except ImportError as err:
        raise PeerUnavailable(f"--torch-peer needs PyTorch and transformers: {err} ({INSTALL_HINT})") from None
    return torch, transformers


def torch_device(device: str | None = None) -> str:
    torch, _ = _import_torch()
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: str) -> str:
    """auto -> bfloat16 on CUDA, float32 on CPU (as the JAX sweep's auto)."""
    if dtype != "auto":
        return dtype
    return "float32" if device == "cpu" else "bfloat16"


def build_torch_model(cfg: ModelConfig, *, dtype: str = "float32", device: str = "cpu", seed: int = 0,
                      state_dict: dict[str, np.ndarray] | None = None):
    """A transformers *ForCausalLM of `cfg`'s shape (config via psynth_jax.interop.export.hf_config),
    SDPA attention, eval mode; random weights, or `state_dict` (transformers names and layout, as
    `psynth_jax.interop.export.merged_tensors` gives) loaded strictly."""
    torch, transformers = _import_torch()
    c = hf_config(cfg, dtype)
    c.pop("architectures", None)
    model_type = c.pop("model_type")
    conf = transformers.AutoConfig.for_model(model_type, **c)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise directly on the device (no host copy of an 8B model)
        model = transformers.AutoModelForCausalLM.from_config(conf, attn_implementation="sdpa", dtype=torch_dtype)
    if state_dict is not None:
        tensors = {k: torch.from_numpy(np.array(v, np.float32)).to(device=device, dtype=torch_dtype)
                   for k, v in state_dict.items()}
        model.load_state_dict(tensors, strict=True)
    return model.eval()


def text_first_token(model, tokens):
    """argmax of the last position's logits after a forward over `tokens` [B, T] (cache built)."""
    out = model(input_ids=tokens, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1)


def cache_first_token(model, prompt, past):
    """argmax of the last prompt position's logits, the prompt run over `past` (consumed)."""
    out = model(input_ids=prompt, past_key_values=past, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1)


class PeerPoint:
    """One (K, L) point's inputs on the peer, and one timed call of either path at a time.

    Built outside any timer: the K*L + prompt text tokens, and the branch `DynamicCache` of K*L
    tokens (a forward over random tokens) with the prompt to run over it. A path whose inputs
    ran out of memory is in `errors` ("peer_text" / "peer_cache" -> message) and is not timed.
    """

    PATHS = ("peer_text", "peer_cache")

    def __init__(self, model, cfg: ModelConfig, k: int, l: int, *, prompt_tokens: int, batch: int = 1,
                 seed: int = 0, device: str = "cpu") -> None:
        torch, _ = _import_torch()
        self.model, self.device = model, device
        self.errors: dict[str, str] = {}
        self.tokens = self.branches = self.prompt = None
        gen = torch.Generator(device="cpu").manual_seed(seed * 100003 + k * 1009 + l)

        def randint(t: int):
            return torch.randint(0, cfg.vocab_size, (batch, t), generator=gen).to(device)

        self.tokens = randint(k * l + prompt_tokens)
        try:
            with torch.inference_mode():
                self.branches = model(input_ids=randint(k * l), use_cache=True, logits_to_keep=1).past_key_values
            self.prompt = randint(prompt_tokens)
        except Exception as err:  # noqa: BLE001 - OOM is a result, anything else is re-raised
            if not is_oom(err):
                raise
            self.errors["peer_cache"] = _oom_message(err)
            _free(torch, device)

    def time(self, path: str) -> float:
        """One call of `path` ("peer_text" or "peer_cache") to its first token, seconds; the cache
        path runs over a deep copy of the branches made outside the timer."""
        torch, _ = _import_torch()
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        with torch.inference_mode():
            if path == "peer_text":
                return time_once(lambda: text_first_token(self.model, self.tokens), wait=lambda _: sync())
            if path == "peer_cache":
                return time_once(lambda past: cache_first_token(self.model, self.prompt, past),
                                 setup=lambda: copy.deepcopy(self.branches), wait=lambda _: sync())
        raise ValueError(f"unknown peer path {path!r}; choose one of {self.PATHS}")

    def release(self) -> None:
        self.tokens = self.branches = self.prompt = None
        _free(_import_torch()[0], self.device)


def _oom_message(err: BaseException) -> str:
    return f"out of memory: {str(err).splitlines()[0][:300]}"


def measure_peer_point(model, cfg: ModelConfig, k: int, l: int, *, prompt_tokens: int, batch: int = 1,
                       repeats: int = 3, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """One (K, L) point: peer_text_ttft_ms and peer_cache_ttft_ms (medians) with their raw times;
    each path's first call, then `repeats` rounds of one text and one cache call."""
    point = PeerPoint(model, cfg, k, l, prompt_tokens=prompt_tokens, batch=batch, seed=seed, device=device)
    row: dict[str, Any] = {"K": k, "L": l}
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    live = [p for p in PeerPoint.PATHS if p not in point.errors]
    for rnd in range(max(int(repeats), 1) + 1):  # round 0: the first calls
        for path in list(live):
            try:
                t = point.time(path)
            except Exception as err:  # noqa: BLE001
                if not is_oom(err):
                    raise
                point.errors[path] = _oom_message(err)
                live.remove(path)
                continue
            if rnd == 0:
                first[path] = t
            else:
                times.setdefault(path, []).append(t)
    point.release()
    record = Recorder()
    for path in live:
        row[f"{path}_ttft_ms"] = record.record(f"{path}_ttft", Timing(first[path], times[path]))
    row.update({f"{path}_error": msg for path, msg in point.errors.items()})
    row["peer_first_call_ms"], row["peer_times_ms"] = record.first, record.times
    return row


def _free(torch, device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


ORDERS = {
    "first": "every point in a child process before the JAX sweep (JAX preallocates GPU memory when it starts)",
    "interleaved": "a child process serving one call at a time, alternated with JAX's per point and per repeat "
                   "(peer text, JAX text, peer cache, JAX cache, ...): a slow spell of the host hits both sides",
}


def peer_metadata(device: str, dtype: str, order: str = "first") -> dict[str, Any]:
    torch, transformers = _import_torch()
    kind = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    return {
        "framework": "pytorch + transformers", "torch": torch.__version__, "transformers": transformers.__version__,
        "device": device, "device_kind": kind, "dtype": dtype, "attn_implementation": "sdpa",
        "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "weights": "random (transformers init)",
        "order": order, "order_note": ORDERS[order],
        "definitions": {
            "peer_text_ttft_ms": "transformers forward over K*L + prompt tokens (use_cache, logits_to_keep=1) + argmax",
            "peer_cache_ttft_ms": "transformers forward of the prompt over a deep copy (made outside the timer) "
                                  "of a DynamicCache of K*L tokens built outside the timer, + argmax",
            "text_vs_peer": "text_ttft_ms / peer_text_ttft_ms (<= 1: JAX text path no slower than PyTorch)",
            "cache_vs_peer": "cache_ttft_ms / peer_cache_ttft_ms (JAX includes the cache preparation, the peer has none)",
        },
    }


def run_peer_sweep(cfg: ModelConfig, *, ks: Sequence[int], ls: Sequence[int], prompt_tokens: int, batch: int = 1,
                   dtype: str = "auto", repeats: int = 3, seed: int = 0, warmup: bool = True, device: str | None = None,
                   verbose: bool = True, state_dict: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Every (K, L) point of the peer in this process: {"metadata": ..., "rows": [...]}."""
    device = torch_device(device)
    dtype = resolve_dtype(dtype, device)
    say = (lambda m: print(f"[bench peer] {m}", file=sys.stderr, flush=True)) if verbose else (lambda m: None)
    say(f"building the transformers model ({cfg.family}, {dtype}, sdpa) on {device}")
    model = build_torch_model(cfg, dtype=dtype, device=device, seed=seed, state_dict=state_dict)
    points = [(int(k), int(l)) for k in ks for l in ls]
    rows = []
    if warmup:
        say("warm-up pass on the first point (discarded)")
        measure_peer_point(model, cfg, *points[0], prompt_tokens=prompt_tokens, batch=batch, repeats=1, seed=seed,
                           device=device)
    for i, (k, l) in enumerate(points):
        say(f"point {i + 1}/{len(points)}: K={k} L={l}")
        rows.append(measure_peer_point(model, cfg, k, l, prompt_tokens=prompt_tokens, batch=batch, repeats=repeats,
                                       seed=seed, device=device))
    meta = peer_metadata(device, dtype)
    del model
    _free(_import_torch()[0], device)
    return {"metadata": meta, "rows": rows}


# ------------------------------------------------------------------ child process
def _cfg_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _cfg_from_dict(d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
    return ModelConfig(**d)


def run_peer_subprocess(cfg: ModelConfig, out_path: str | Path, **settings: Any) -> dict[str, Any]:
    """run_peer_sweep(cfg, **settings) in a fresh interpreter; its result is also kept at `out_path`.

    The child sees JAX_PLATFORMS=cpu and no JAX preallocation, so nothing there reserves GPU
    memory besides torch; its progress goes to this process's stderr. OMP_WAIT_POLICY defaults to
    PASSIVE there: torch's OpenMP threads otherwise spin at every barrier, and on a shared CPU
    whose cores are busy that turns a 15 ms forward into 100-600 ms (measured on the 2-core VM).
    """
    require_torch()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path = out_path.with_suffix(".spec.json")
    spec_path.write_text(json.dumps({"model_config": _cfg_to_dict(cfg), "settings": settings}, indent=2))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peer", str(spec_path), str(out_path)], env=_child_env())
    spec_path.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the PyTorch peer failed (exit code {proc.returncode}); see its output above")
    return json.loads(out_path.read_text())


def _child_env() -> dict[str, str]:
    """The peer child's environment: no JAX backend on a GPU, torch's OpenMP threads not spinning
    (see run_peer_subprocess)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


class PeerProcess:
    """The peer in a child process that serves one timed call at a time (`--peer-order interleaved`).

    The parent (the JAX sweep) asks for a point's inputs (`point`), then for single calls
    (`time`), alternating them with its own, so both sides see the same moments of a shared
    host. The child (`python -m benchmarks.peer --serve SPEC`) reads one JSON request per line
    on stdin and answers one JSON line on its own stdout; its prints go to stderr. On a GPU both
    processes hold their memory at once, so there the peer runs first (`run_peer_subprocess`).
    """

    def __init__(self, cfg: ModelConfig, *, dtype: str = "auto", seed: int = 0, prompt_tokens: int,
                 batch: int = 1, spec_dir: str | Path) -> None:
        require_torch()
        spec_path = Path(spec_dir) / "ttft_peer.spec.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps({"model_config": _cfg_to_dict(cfg), "settings": {
            "dtype": dtype, "seed": seed, "prompt_tokens": prompt_tokens, "batch": batch}}, indent=2))
        self._proc = subprocess.Popen([sys.executable, "-m", "benchmarks.peer", "--serve", str(spec_path)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env(), text=True)
        try:
            self.metadata: dict[str, Any] = self._ask(op="metadata")["metadata"]
        finally:
            spec_path.unlink(missing_ok=True)

    def _ask(self, **request: Any) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self._proc.wait()
            raise RuntimeError(f"the PyTorch peer process exited (code {code}) during {request['op']!r}; "
                               "see its output above")
        return json.loads(line)

    def point(self, k: int, l: int) -> dict[str, str]:
        """Build the inputs of (K, L) in the child (the previous point's are freed): errors by path."""
        return self._ask(op="point", K=k, L=l)["errors"]

    def time(self, path: str) -> float:
        """One timed call of `path` in the child, seconds; OutOfMemory if it ran out of memory."""
        reply = self._ask(op="time", path=path)
        if "error" in reply:
            raise OutOfMemory(reply["error"])
        return reply["s"]

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._ask(op="end")
            except RuntimeError:
                pass
            self._proc.wait(timeout=60)

    def __enter__(self) -> "PeerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(spec_path: str | Path) -> int:
    """The child of PeerProcess: build the model, then answer requests until "end" or EOF."""
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # anything printed by torch or transformers stays off the channel
    os.dup2(sys.stderr.fileno(), 1)
    spec = json.loads(Path(spec_path).read_text())
    cfg, settings = _cfg_from_dict(spec["model_config"]), spec["settings"]
    device = torch_device()
    dtype = resolve_dtype(settings["dtype"], device)
    print(f"[bench peer] serving: transformers model ({cfg.family}, {dtype}, sdpa) on {device}", file=sys.stderr,
          flush=True)
    model = build_torch_model(cfg, dtype=dtype, device=device, seed=settings["seed"])
    point: PeerPoint | None = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "metadata":
            reply: dict[str, Any] = {"metadata": peer_metadata(device, dtype, order="interleaved")}
        elif op == "point":
            if point is not None:
                point.release()
            point = PeerPoint(model, cfg, request["K"], request["L"], prompt_tokens=settings["prompt_tokens"],
                              batch=settings["batch"], seed=settings["seed"], device=device)
            reply = {"errors": point.errors}
        elif op == "time" and point is not None:
            try:
                reply = {"s": point.time(request["path"])}
            except Exception as err:  # noqa: BLE001
                if not is_oom(err):
                    raise
                reply = {"error": _oom_message(err)}
        elif op == "end":
            return 0
        else:
            raise ValueError(f"unknown peer request {request!r}")
        channel.write(json.dumps(reply) + "\n")
        channel.flush()
    return 0


# ------------------------------------------------------------------ `psynth bench peer`
def add_arguments(p) -> None:
    """The `psynth bench peer` options: the PyTorch side of `bench ttft --torch-peer`, alone."""
    p.add_argument("--arch", type=arch_type, default="tiny-llama",
                   help="architecture preset or a transformers config.json / model dir (random weights)")
    p.add_argument("--ks", type=int_list, default="1,2,4", help="branch counts K, comma-separated")
    p.add_argument("--ls", type=int_list, default="32,64,128", help="tokens per branch L, comma-separated")
    p.add_argument("--prompt-tokens", type=int, default=32, help="synthesizer prompt tokens")
    p.add_argument("--batch", type=int, default=1, help="requests per call")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true", help="skip the discarded warm-up pass over the first point")
    p.add_argument("--out", default="runs/bench", help="output directory (peer.json)")


def run(args) -> int:
    """Time the peer at every (K, L) in this process (no JAX backend is started here) and write
    `<out>/peer.json`: {"metadata", "rows"}, rows keyed by K and L as `bench ttft`'s, so the two
    can be joined (JAX time / peer time) when both ran at the same points and prompt length."""
    require_torch()
    if args.prompt_tokens < 1 or args.batch < 1 or args.repeats < 1:
        raise ValueError("--prompt-tokens, --batch and --repeats must be >= 1")
    cfg, arch, hub = resolve_arch(args.arch)
    longest = max(args.ks) * max(args.ls) + args.prompt_tokens
    if longest > cfg.max_position_embeddings:
        raise ValueError(f"K*L + prompt = {longest} tokens exceeds the model's {cfg.max_position_embeddings} positions")
    result = run_peer_sweep(cfg, ks=args.ks, ls=args.ls, prompt_tokens=args.prompt_tokens, batch=args.batch,
                            dtype=args.dtype, repeats=args.repeats, seed=args.seed, warmup=not args.no_warmup)
    meta = {"benchmark": "peer", "arch": arch, "hub_id": hub, "model_config": _cfg_to_dict(cfg),
            "ks": list(args.ks), "ls": list(args.ls), "prompt_tokens": args.prompt_tokens, "batch": args.batch,
            "repeats": args.repeats, "seed": args.seed, "warmup": not args.no_warmup, **result["metadata"]}
    for row in result["rows"]:
        say("peer", f"K={row['K']} L={row['L']}: text {row.get('peer_text_ttft_ms', float('nan')):.2f} ms, "
                    f"cache {row.get('peer_cache_ttft_ms', float('nan')):.2f} ms")
    say("peer", f"wrote {write_json(Path(args.out) / 'peer.json', meta, result['rows'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--serve":
        return serve(argv[1])
    if len(argv) != 2:
        print("usage: python -m benchmarks.peer SPEC.json OUT.json | --serve SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    result = run_peer_sweep(_cfg_from_dict(spec["model_config"]), **spec["settings"])
    Path(argv[1]).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
