"""Child of tests/test_serve.py's mesh test: the engine on 2 fake CPU devices (decode slots over `data`)
against one device, a chat row and a cache-synthesis row decoded together. Prints one JSON line."""
import dataclasses
import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 2)
sys.path.insert(0, str(Path(__file__).parent))
import numpy as np  # noqa: E402

from psynth_jax.model.sharding import mesh_of, state_shardings  # noqa: E402
from psynth_jax.serve.engine import Engine, RowSampling, stack_branches  # noqa: E402
from psynth_jax.synthesis.pipeline import ParallelSynthesis  # noqa: E402
from serve_fixtures import lively_model  # noqa: E402


def run(model) -> tuple[list[list[int]], float]:
    """Greedy tokens of a chat row (slot 0) and a synthesis row (slot 1), and a sum of slot 0's handed-over keys."""
    synth = ParallelSynthesis(model)
    eng = Engine(synth, slots=2, max_context=512)
    st = eng.init_decode_state()
    outs = []
    p = synth.gen.chat_tokens([{"role": "user", "content": "What is 2+2?"}])
    br = [eng.branch_from_tokens(p, synth.tok.encode(t, add_special_tokens=False), synth.handoff)
          for t in ("one two three", "four five six seven")]
    q = synth.gen.chat_tokens([{"role": "user", "content": "Combine."}])
    pre0 = eng.prefill(p, RowSampling())
    pre1 = eng.prefill_synthesis(q, stack_branches(br), RowSampling(), max_tokens=16)
    st = eng.insert(pre0, st, 0, RowSampling(), lora=False)
    st = eng.insert(pre1, st, 1, RowSampling(), lora=True)
    toks = [np.asarray(st.tokens).tolist()]
    for _ in range(10):
        st, t = eng.generate(st, np.array([True, True]))
        toks.append(np.asarray(t).tolist())
    hb = eng.hand_over(st, 0, len(p), 8, False, synth.handoff)
    return toks, float(np.asarray(hb.k).sum())


m = lively_model()
one = run(m)
mesh = mesh_of((2, 1, 1))
sharded = dataclasses.replace(m, state=jax.device_put(m.state, state_shardings(m.state, mesh, m.rules)), mesh=mesh)
two = run(sharded)
print(json.dumps({"one": one[0], "two": two[0], "keys_one": one[1], "keys_two": two[1],
                  "devices": jax.device_count()}))
