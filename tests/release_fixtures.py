"""Checkpoint folders laid out and written the way the reference release's training CLI writes them.

The release (Graph-COM/Parallel-Synthesis, parallel_synthesis/cli/train_mixed_tasks.py and
methods/parallel_kv.py) saves, per step checkpoint, into RUN/step_checkpoints/latest/:
`torch.save(cache_mapper.state_dict(), "cache_mapper.pt")`, cache_mapper_config.json
({hidden_dim, metadata_features}), `PeftModel.save_pretrained("judger_lora")` and
checkpoint_meta.json ({global_step, epoch, source_run_dir, metrics}); RUN/run_args.json holds
every CLI argument. Its published checkpoint has the mapper and judger_lora/ at the top. Its
adapter carries embed_tokens / lm_head at the tokenizer's vocabulary size, smaller than the
model config's padded one: PEFT saves them because training ran on a resized vocabulary.

Here the same files are written with torch + PEFT in the test process, on a tiny Qwen3 whose
config has 211 tokens and whose tokenizer has 200. The saved embedding rows are then moved
slightly (as if they had been trained), so an importer that truncated the base model's rows
instead of taking the adapter's would be caught.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_models

TOKENIZER_VOCAB = 200  # the model config pads to hf_models.COMMON["vocab_size"] = 211
MODEL_NAME = "Qwen/Qwen3-tiny-test"


class CacheMapper(torch.nn.Module):
    """The release's LengthAwareAffineKVMapper as far as its state dict goes: `net` = the MLP."""

    def __init__(self, inputs: int = 3, hidden: int = 32, outputs: int = 4):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, outputs))


def make_base(directory: Path) -> Path:
    """A tiny Qwen3 (sharp attention) with a 200-token tokenizer and a 211-row padded vocabulary."""
    hf_models.make_tiny_sharp("qwen3", False, directory, seed=5)
    hf_models.save_tiny_tokenizer(directory, vocab_size=TOKENIZER_VOCAB)
    return directory


def trained_mapper(seed: int, inputs: int = 3, hidden: int = 32, outputs: int = 4) -> CacheMapper:
    torch.manual_seed(seed)
    m = CacheMapper(inputs, hidden, outputs)
    with torch.no_grad():  # the release zero-initialises the last layer; a trained one is not zero
        m.net[2].weight.normal_(0, 0.5)
        m.net[2].bias.normal_(0, 0.5)
    return m


def save_judger_lora(base: Path, directory: Path, *, seed: int, vocab: int = TOKENIZER_VOCAB) -> None:
    """PeftModel.save_pretrained of a LoRA r4/a8 on q,k,v,o trained on the base resized to `vocab`."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base).float()
    model.resize_token_embeddings(vocab)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             task_type="CAUSAL_LM", bias="none")
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(directory)
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    assert {k for k in tensors if "lora_" not in k} == {"base_model.model.model.embed_tokens.weight",
                                                       "base_model.model.lm_head.weight"}, "PEFT saved no embeddings"
    # one shift for both, so a tied head stays equal to the embedding (as PEFT saves a tied pair)
    shift = 0.05 * torch.randn(tensors["base_model.model.lm_head.weight"].shape, generator=torch.Generator().manual_seed(seed))
    for k in ("base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"):
        tensors[k] = tensors[k] + shift
    save_file(tensors, str(weights), metadata={"format": "pt"})


def run_args(base: Path, **changes) -> dict:
    """The training CLI's run_args.json (the arguments that matter here, as it serialises them)."""
    args = {"method": "parallel_kv", "model_name": MODEL_NAME, "tasks": "gsm8k", "max_new_tokens": 4096,
            "temperature": 0.6, "top_p": 0.95, "parallel_kv_train_components": "both",
            "parallel_kv_enable_affine_map": True, "parallel_kv_enable_judger_lora": True,
            "parallel_kv_mapper_hidden_dim": 32, "parallel_kv_mapper_metadata_features": "both",
            "parallel_kv_num_parallel_agents": 3, "parallel_kv_lora_r": 4, "parallel_kv_lora_alpha": 8,
            "train_parallel_kv": True, "use_vllm": False}
    args.update(changes)
    return args


def write_release_run(base: Path, run: Path, *, seed: int = 0, step: int = 95) -> Path:
    """RUN/run_args.json + RUN/step_checkpoints/latest/ as the release's training CLI leaves them;
    returns the step checkpoint directory."""
    ckpt = run / "step_checkpoints" / "latest"
    ckpt.mkdir(parents=True)
    (run / "run_args.json").write_text(json.dumps(run_args(base), indent=2))
    torch.save(trained_mapper(seed).state_dict(), ckpt / "cache_mapper.pt")
    (ckpt / "cache_mapper_config.json").write_text(json.dumps({"hidden_dim": 32, "metadata_features": "both"}, indent=2))
    save_judger_lora(base, ckpt / "judger_lora", seed=seed)
    (ckpt / "checkpoint_meta.json").write_text(json.dumps(
        {"global_step": step, "epoch": 1, "source_run_dir": str(run), "metrics": {"loss": 1.0}}, indent=2))
    return ckpt


def published_layout(ckpt: Path, out: Path) -> Path:
    """The published checkpoint's layout: cache_mapper.pt and judger_lora/ at the top, nothing else."""
    out.mkdir(parents=True)
    shutil.copy2(ckpt / "cache_mapper.pt", out / "cache_mapper.pt")
    shutil.copytree(ckpt / "judger_lora", out / "judger_lora")
    return out


def torch_release_model(base: Path, lora_dir: Path) -> torch.nn.Module:
    """What the release's runner builds: align_model_vocab_to_adapter, then PeftModel.from_pretrained."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base).float().eval()
    with safe_open(str(lora_dir / "adapter_model.safetensors"), "pt") as f:
        sizes = {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(("embed_tokens.weight", "lm_head.weight"))}
    if sizes:
        (vocab,) = sizes
        if vocab != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(vocab)
    return peft.PeftModel.from_pretrained(model, lora_dir).eval()
