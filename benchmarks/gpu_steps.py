"""The GPU check's steps: what each one runs, its time cap on one H200, and how the cap was sized.

`STEPS` is in order of importance (correctness first); each `Step` is one `psynth bench ...`
command in its full form (real shapes, bfloat16, cuDNN) and its smoke form (tiny shapes, float32,
XLA attention: a CPU test of the whole chain). Adding a step is one entry here and, for its
figures, a reader in gpu_figures.READERS. The driver is gpu_check.py.
"""

from __future__ import annotations

import dataclasses

BUDGET_S = 480.0  # the whole command on the H200: every cap below adds up to at most this


@dataclasses.dataclass(frozen=True)
class Step:
    """One capped step: a `psynth bench <benchmark>` command (or `pip` for the install).

    full / smoke: the benchmark's arguments in each mode (`--out` is added: `<work>/<name>`).
    Sweeps keep the full run's number of points in smoke mode, so a figure is named by its
    full-run point whichever mode measured it. cap_s: the H200 cap (full mode); estimate: how
    it was sized. roofline: pass `--roofline-json` of the roofline step, or `no_roofline` when
    that step left no roofline.json. env: extra environment of the child process.
    """

    name: str
    title: str
    benchmark: str
    full: tuple[str, ...]
    smoke: tuple[str, ...]
    cap_s: float
    estimate: str
    result: str = ""
    roofline: bool = False
    no_roofline: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    smoke_cap_s: float = 180.0

    def args(self, smoke: bool) -> tuple[str, ...]:
        return self.smoke if smoke else self.full


SMOKE_COMMON = ("--dtype", "float32", "--attn-impl", "xla")
# smoke runs time nothing that matters: XLA:CPU compiles about twice as fast without LLVM's
# expensive passes, and compilation is most of a smoke run
SMOKE_ENV = (("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"),)
# torch's OpenMP threads otherwise spin at every barrier on a busy CPU (see peer.run_peer_subprocess)
PEER_ENV = (("JAX_PLATFORMS", "cpu"), ("OMP_WAIT_POLICY", "PASSIVE"))

# In order of importance. Estimates: H200, ~990 TFLOP/s bf16 dense, ~4.8 TB/s; a fresh process
# (python + jax + CUDA init) ~6 s; XLA:GPU compiles a scanned 28-40 layer forward in ~3-6 s.
STEPS: tuple[Step, ...] = (
    Step("install", "pip install --no-deps -e . (the machine's jax, flax and torch untouched)", "pip",
         full=(), smoke=(), cap_s=15, estimate="pip, no network, no build isolation: ~5 s",
         env=(("PIP_BREAK_SYSTEM_PACKAGES", "1"),)),  # a system Python (PEP 668); --no-deps touches nothing else
    Step("kernels", "correctness: cuDNN attention vs the XLA reference (prefill, extend, decode, extend "
                    "gradients; head_dim 64/128; bf16/f32) and the cache path's greedy tokens per family",
         "kernels", result="kernels.json",
         full=("--impl", "cudnn", "--dtypes", "bfloat16,float32", "--head-dims", "64,128",
               "--families", "llama,qwen2,qwen3", "--model-dtype", "bfloat16", "--new-tokens", "16"),
         smoke=("--impl", "xla_split", "--dtypes", "float32", "--head-dims", "64", "--families", "qwen3",
                "--model-dtype", "float32", "--new-tokens", "8"),
         cap_s=60, estimate="~40 small compiles (16 layout cases, 3 tiny models x 2 kernels) ~35 s + start 6 s"),
    Step("roofline", "measured bf16 matmul peak and memory bandwidth (the floors of every later step)",
         "roofline", result="roofline.json",
         full=("--dtype", "bfloat16", "--repeats", "5"),
         smoke=("--dtype", "float32", "--sizes", "128,256", "--mib", "8", "--repeats", "2"),
         cap_s=25, estimate="3 matmul compiles, 16k^3 matmul ~9 ms x 6, 1 GiB copies: ~8 s + start 6 s"),
    Step("ttft7b", "text vs cache TTFT, Qwen2.5-7B shape, K 2,8 x L 1024,2048: floor ratio, text MFU, "
                   "speedup, preparation share", "ttft", result="ttft.json", roofline=True,
         no_roofline=("--no-roofline",),
         full=("--arch", "qwen2.5-7b", "--dtype", "bfloat16", "--attn-impl", "cudnn", "--ks", "2,8",
               "--ls", "1024,2048", "--prompt-tokens", "128", "--repeats", "5", "--no-plot"),
         smoke=("--arch", "tiny-qwen2", *SMOKE_COMMON, "--ks", "2,8", "--ls", "16,32", "--prompt-tokens", "8",
                "--new-tokens", "8", "--repeats", "2", "--no-warmup", "--no-plot"),
         cap_s=85, estimate="15 GB random weights ~8 s; 4 points x 5 compiles ~60 s; 8x2048 text "
                            "2.7e14 FLOP ~0.4 s x 7: ~75 s"),
    Step("ttft14b", "the release's setting: Qwen3-14B shape, K 3 x L 4096", "ttft", result="ttft.json",
         roofline=True, no_roofline=("--no-roofline",),
         full=("--arch", "qwen3-14b", "--dtype", "bfloat16", "--attn-impl", "cudnn", "--ks", "3", "--ls", "4096",
               "--prompt-tokens", "128", "--repeats", "5", "--no-plot"),
         smoke=("--arch", "tiny-qwen3", *SMOKE_COMMON, "--ks", "3", "--ls", "48", "--prompt-tokens", "8",
                "--new-tokens", "8", "--repeats", "2", "--no-warmup", "--no-plot"),
         cap_s=50, estimate="30 GB weights ~12 s; 5 compiles ~20 s; text 3.6e14 FLOP ~0.5 s x 8: ~40 s"),
    Step("zerocopy14b", "the zero-copy cache path (branch K/V read in place; XLA blockwise attention) at the "
                        "release's setting, Qwen3-14B shape, K 3 x L 4096", "ttft", result="ttft.json",
         roofline=True, no_roofline=("--no-roofline",),
         full=("--arch", "qwen3-14b", "--dtype", "bfloat16", "--attn-impl", "xla", "--cache-path", "view",
               "--ks", "3", "--ls", "4096", "--prompt-tokens", "128", "--repeats", "3", "--no-plot"),
         smoke=("--arch", "tiny-qwen3", *SMOKE_COMMON, "--cache-path", "view", "--ks", "3", "--ls", "48",
                "--prompt-tokens", "8", "--new-tokens", "8", "--repeats", "2", "--no-warmup", "--no-plot"),
         cap_s=30, estimate="30 GB weights ~12 s; 5 compiles ~12 s; blockwise XLA attention, ~2x cuDNN: ~26 s"),
    Step("peer7b", "PyTorch + transformers SDPA peer, Qwen2.5-7B shape, 8 x 2048", "peer", result="peer.json",
         env=PEER_ENV,
         full=("--arch", "qwen2.5-7b", "--dtype", "bfloat16", "--ks", "8", "--ls", "2048", "--prompt-tokens", "128",
               "--repeats", "3"),
         smoke=("--arch", "tiny-qwen2", "--dtype", "float32", "--ks", "8", "--ls", "32", "--prompt-tokens", "8",
                "--repeats", "2"),
         cap_s=35, estimate="torch + transformers import ~6 s, init on the GPU ~5 s, ~12 forwards of 16.5k "
                            "tokens ~0.5 s: ~25 s"),
    Step("peer14b", "PyTorch + transformers SDPA peer, Qwen3-14B shape, 3 x 4096", "peer", result="peer.json",
         env=PEER_ENV,
         full=("--arch", "qwen3-14b", "--dtype", "bfloat16", "--ks", "3", "--ls", "4096", "--prompt-tokens", "128",
               "--repeats", "3"),
         smoke=("--arch", "tiny-qwen3", "--dtype", "float32", "--ks", "3", "--ls", "48", "--prompt-tokens", "8",
                "--repeats", "2"),
         cap_s=35, estimate="as peer7b with 30 GB of weights and 12.4k-token forwards ~0.8 s: ~30 s"),
    Step("decode", "decode ms/token over a 16k-token cache against the bandwidth floor (Qwen2.5-7B, B=1)",
         "decode", result="decode.json", roofline=True,
         full=("--arch", "qwen2.5-7b", "--dtype", "bfloat16", "--attn-impl", "cudnn", "--cache-tokens", "16384",
               "--steps", "64", "--repeats", "3", "--no-plot"),
         smoke=("--arch", "tiny-qwen2", *SMOKE_COMMON, "--cache-tokens", "256", "--steps", "8", "--repeats", "2",
                "--no-plot"),
         cap_s=35, estimate="floor ~3.1 ms/token (15 GB / 4.8 TB/s); 2 compiles ~10 s; 4 x 64 + 65 steps ~1.5 s; "
                            "weights ~8 s: ~28 s"),
    Step("train", "the trainer's step at the Qwen3-14B shape, 3 x 1024 branch + 512 live tokens, remat on",
         "train", result="train.json", roofline=True,
         full=("--arch", "qwen3-14b", "--dtype", "bfloat16", "--attn-impl", "cudnn", "--branches", "3",
               "--branch-tokens", "1024", "--live-tokens", "512", "--remat", "on", "--repeats", "3", "--no-plot"),
         smoke=("--arch", "tiny-qwen3", *SMOKE_COMMON, "--branches", "3", "--branch-tokens", "16",
                "--live-tokens", "16", "--remat", "on", "--repeats", "2", "--no-plot"),
         cap_s=55, estimate="30 GB weights ~12 s; forward + backward compile ~25 s; ~1.1e14 FLOP/step ~0.2 s x 4: "
                            "~45 s"),
    Step("batch", "batched synthesis at B = 1 and 8 (Qwen2.5-7B, K 4 x L 1024, 128 new tokens): TTFT and "
                  "output tokens/s", "batch", result="batch.json",
         full=("--arch", "qwen2.5-7b", "--dtype", "bfloat16", "--attn-impl", "cudnn", "--bs", "1,8", "--k", "4",
               "--l", "1024", "--prompt-tokens", "128", "--new-tokens", "128", "--repeats", "2", "--no-warmup",
               "--no-plot"),
         smoke=("--arch", "tiny-qwen2", *SMOKE_COMMON, "--bs", "1,8", "--k", "4", "--l", "16", "--prompt-tokens",
                "8", "--new-tokens", "8", "--repeats", "2", "--no-warmup", "--no-plot"),
         cap_s=50, estimate="weights ~8 s; 2 x 6 compiles ~25 s; 2 x 2 paths x 6 calls of 128 tokens at ~3.3 ms: "
                            "~10 s: ~45 s"),
)


def step_names() -> list[str]:
    return [s.name for s in STEPS]
