"""`psynth` command line: one subcommand per module, imported only when it runs.

Building the parser imports every command module, so each one imports at its top only what
its options need (the CLI helpers, the config schema); its command's stack (jax, the model,
training, data, evaluation) is imported inside `run`. So `psynth generate` on an inference-only
box never touches training, data or evaluation code (or their dependencies).

Every failure takes one path (`main`): a one-line message `psynth COMMAND: error: ...` that names
the file (and line), the config field or the flag, and one exit code per kind (EXIT_CODES, also
in `psynth --help` and the README). `--debug` (or PSYNTH_DEBUG=1) shows the traceback too, with
the same exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import signal
import sys
import threading
import traceback
import types
from typing import Iterator

from psynth_jax.config.typed import ConfigError

# subcommand -> (module under psynth_jax.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "generate a completion with a backbone (default: embedded SmolLM2-135M)"),
    "demo": ("demo", "end-to-end Parallel-Synthesis on a GSM8K question: workers, cache/text/single paths, TTFT"),
    "bench": ("bench", "benchmarks with random weights of a named architecture (bench ttft: text vs cache path TTFT)"),
    "train": ("train", "train the cache mapper + synthesizer LoRA from a YAML config (resumes automatically)"),
    "eval": ("eval", "benchmarks x synthesis modes (single, text, naive/mapper-only/LoRA-only cache, psynth): accuracy + TTFT"),
    "compare": ("compare", "two eval runs (weight sets or modes) paired on the same examples: KL to the text path, accuracy, agreement, tests"),
    "export": ("export", "export a trained synthesizer for PyTorch: merged transformers checkpoint and/or PEFT adapter + mapper"),
    "build-data": ("build_data", "build training examples (exposure | aggregation | distillation) as .jsonl/.parquet"),
    "serve": ("serve", "an OpenAI-style HTTP server: chat completions, branch handles, synthesis from branch caches"),
    "plan": ("plan", "per-device memory of a train or eval config on an accelerator, before provisioning it"),
}

EXIT_OK = 0
EXIT_FAILURE = 1  # the command started and something failed while it ran (a crash, out of memory, a lost device)
EXIT_USAGE = 2  # bad flag, config, input file or run directory: nothing was computed or changed
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_PREEMPTED = 143  # `psynth train` got SIGTERM, saved a checkpoint and stopped (rerun to resume)
EXIT_CODES = f"""exit codes:
  {EXIT_OK}    success
  {EXIT_FAILURE}    runtime failure: the command started and something failed while it ran
  {EXIT_USAGE}    usage, config or input error (a flag, a config field, a data or checkpoint file, a run
       directory in use or holding another run): the message names it; nothing saved was changed
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
  {EXIT_PREEMPTED}  psynth train stopped by SIGTERM (preemption) after saving a checkpoint; rerun to resume;
       psynth serve stopped by SIGTERM after the requests in flight finished
--debug (or PSYNTH_DEBUG=1) also shows the traceback of a failure; the exit code is the same."""

# Errors that mean "the input is wrong" (a flag, config, file, run directory), not "the run broke".
# ValueError covers config, JSON/UTF-8 decoding, checkpoint and adapter errors (all subclass it).
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psynth", description="Parallel-Synthesis in JAX: synthesize from worker KV caches.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # also after the subcommand; SUPPRESS keeps the subparser from resetting `psynth --debug X`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of a failure (also PSYNTH_DEBUG=1)")
        mod = importlib.import_module(f"psynth_jax.cli.{module}")
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def one_line(err: BaseException) -> str:
    """An exception's message on one line (a multi-problem config error keeps its list)."""
    text = str(err).strip()
    if isinstance(err, KeyError) and err.args:  # str(KeyError) is the repr of its argument
        text = str(err.args[0])
    if isinstance(err, ConfigError):
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) if len(lines) <= 3 else "; ".join(lines[:3]) + " ..."


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; every failure becomes one line on stderr and an exit code of EXIT_CODES.

    A process of a pod that fails exits at once: it does not wait for the others at the JAX
    runtime's shutdown barrier, where they would never come (they are blocked in a collective this
    process will not join), so the launcher sees the failure now and stops the rest.
    """
    with _interrupts():
        code = _run(argv)
    if (code not in (EXIT_OK, EXIT_PREEMPTED) and _in_a_pod()) or (code == EXIT_INTERRUPTED and argv is None):
        # Interrupted as the program: exit now, skipping the interpreter's teardown, where the XLA
        # runtime's threads, stopped mid-computation, could crash it (eval: Segmentation fault, 139)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


@contextlib.contextmanager
def _interrupts() -> Iterator[None]:
    """Ctrl-C that always reaches `_run`: Python raises KeyboardInterrupt wherever the main thread
    is, and inside a garbage-collection callback or a finalizer (jax's `_xla_gc_callback` runs on
    every collection) it is printed as "Exception ignored" and lost: the command ran on. Such an
    interrupt is delivered again a moment later, once out of the callback."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield  # not ours to handle (a background job ignores Ctrl-C)
        return

    def on_sigint(signum: int, frame: types.FrameType | None) -> None:
        if _in_a_finalizer(frame):
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            return
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _in_a_finalizer(frame: types.FrameType | None) -> bool:
    """Whether `frame` (or a caller) runs a gc callback or a __del__, where an exception is swallowed."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name in ("__del__", "_xla_gc_callback"):
            return True
        frame = frame.f_back
    return False


def _in_a_pod() -> bool:
    jax = sys.modules.get("jax")
    return jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False) or os.environ.get("PSYNTH_DEBUG"))
    prefix = f"psynth {args.command}: error:"
    try:
        return int(args._module.run(args) or 0)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        message = e.code.removeprefix(f"psynth {args.command}: ")  # a command's own usage message
        return _fail(debug, f"{prefix} {message}", EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail(debug, f"psynth {args.command}: interrupted", EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - every other failure: one line, the traceback on --debug
        if _raised_by_an_interrupt(e):
            return _fail(debug, f"psynth {args.command}: interrupted", EXIT_INTERRUPTED)
        if isinstance(e, INPUT_ERRORS):
            return _fail(debug, f"{prefix} {one_line(e)}", EXIT_USAGE)
        hint = "" if debug else " (--debug shows the traceback)"
        return _fail(debug, f"{prefix} {type(e).__name__}: {one_line(e)}{hint}", EXIT_FAILURE)


def _raised_by_an_interrupt(e: BaseException) -> bool:
    """Whether Ctrl-C caused `e`: an interrupt raised inside a Python callback that jax's C++ runs
    comes back wrapped, e.g. a pytree's metadata `__eq__` during a jit cache lookup gives "ValueError:
    Exception raised while checking equality of metadata fields" with the KeyboardInterrupt as its
    cause (CI saw that exit 2 instead of 130)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _fail(debug: bool, message: str, code: int) -> int:
    """Report a failure: the traceback first under --debug, then always the one line; the exit
    code is the same either way (the README's contract holds under --debug too)."""
    if debug:
        traceback.print_exc(file=sys.stderr)
    print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
