"""The one place a LoadedModel becomes the C++ engine's model (`pyserve._C.Model`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from pyserve.model.loader import LoadedModel

log = logging.getLogger(__name__)


def native_model(model: LoadedModel, num_threads: int = 0, isa: str = "auto", *,
                 release_tensors: bool = False, device: str = "cpu") -> Any:
    """Packs the model's weights for the C++ backend on `device` (cpu, cuda[:N], rocm[:N]; on the
    CPU `num_threads` 0: all cores, `isa` "auto": the best the CPU and OS allow). The engine packs copies of every weight (quant panels, float
    panels); with release_tensors the loader's own tensors are dropped afterwards, and with them
    the file's memory map, whose pages would otherwise count a second time in the RSS."""
    from pyserve import _C

    tensors = [(name, r.format, r.data, tuple(r.shape)) for name, r in model.tensors.items()]
    c_model = _C.Model(dataclasses.asdict(model.config), tensors, num_threads, isa, device)
    if release_tensors:
        del tensors
        model.tensors = {}
    return c_model


def step_time(c_model: Any, tokens: int, repeats: int = 3) -> float:
    """Seconds one step of `tokens` tokens takes after a 32-token context, every row through the
    LM head as a verifying step's are; best of `repeats`."""
    from pyserve import _C

    times = []
    for _ in range(repeats):
        s = _C.Session(c_model, 64)
        s.forward([1] * 32, False)  # some context to attend to
        t0 = time.perf_counter()
        s.forward([2] * tokens, True)
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_token_cost(c_model: Any, tokens: int = 9, repeats: int = 3) -> float:
    """What one more token adds to a step, relative to a one-token step, on this model and machine:
    (t(tokens) - t(1)) / (tokens - 1) / t(1). The automatic draft length weighs each draft's chance
    against it."""
    one, many = step_time(c_model, 1, repeats), step_time(c_model, tokens, repeats)
    return max(0.0, (many - one) / (tokens - 1) / one)


def measure_draft_cost(target: Any, draft: Any, repeats: int = 3) -> float:
    """A draft model's one-token step, relative to the target's: what making one draft costs."""
    return step_time(draft, 1, repeats) / step_time(target, 1, repeats)


def engine_options(model: LoadedModel, config: Any, max_model_len: int) -> dict[str, Any]:
    """The C++ engine's configuration dict (csrc/bindings.cpp: engine_config_from)."""
    return {
        "max_num_seqs": config.max_num_sequence,
        "max_batch_tokens": config.prefill_chunk_size,
        "page_size": config.page_size,
        "kv_capacity_tokens": config.kv_cache_tokens,
        "max_model_len": max_model_len,
        "eos_token_ids": model.eos_token_ids,
        "chunked_prefill": config.prefill_mode == "chunked",
        "tracing": bool(getattr(config, "enable_tracing", False)),
        "prefix_cache": config.prefix_cache_mode != "disable",
        "prefix_cache_max_recycling": (-2 if config.prefix_cache_max_num_recycling_seqs is None
                                       else config.prefix_cache_max_num_recycling_seqs),
        "speculative_mode": getattr(config, "speculative_mode", "disable"),
        "spec_draft_length": getattr(config, "spec_draft_length", 0),
        "spec_tree_width": getattr(config, "spec_tree_width", 1),
    }


def draft_model(target: LoadedModel, config: Any, isa: str = "auto") -> Any:
    """The small_draft model (the first of --additional-models), checked to speak the target's
    vocabulary: the same size and the same token for every id."""
    from pyserve.model.loader import load_model

    path = config.additional_models[0]
    draft = load_model(path)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft model {path} has {draft.config.vocab_size} tokens; the target has "
                         f"{target.config.vocab_size}: small_draft needs the same vocabulary")
    theirs, ours = draft.tokenizer.get_vocab(), target.tokenizer.get_vocab()
    if theirs != ours:
        differ = sorted(set(theirs.items()) ^ set(ours.items()))[:3]
        raise ValueError(f"the draft model {path} has another vocabulary than the target (e.g. {differ}): "
                         "small_draft needs the same tokens")
    if not draft.format.startswith("gguf"):
        # A draft is worth its cost only if it is cheap: an HF checkpoint runs in MLC's 4-bit
        # q4f16_1 (its LM head alone, in float32, would read more than a Q4 target does).
        from pyserve.model.quantize import quantize_model

        quantize_model(draft, "q4f16_1")
    log.info("small_draft: draft model %s (%d layers)", path, draft.config.num_hidden_layers)
    return native_model(draft, config.num_threads, isa, release_tensors=True, device=config.device)


@dataclasses.dataclass
class DraftDir:
    """A directory of trained draft weights (tools/train_medusa.py, tools/train_eagle.py), read and
    checked against the target: config.json and one safetensors file, with an optional draft
    vocabulary (int32 token ids) whose LM head rows are taken from the target's own head."""
    path: str
    config: dict[str, Any]
    records: dict[str, Any]  # name -> TensorRecord
    draft_vocab: list[int]
    lm_head: tuple[str, str, Any, tuple[int, ...]] | None  # the target's rows for draft_vocab

    def tensor(self, name: str) -> tuple[str, str, Any, tuple[int, ...]]:
        if name not in self.records:
            raise ValueError(f"{self.path}: no tensor {name}")
        r = self.records[name]
        return (name, r.format, r.data, tuple(r.shape))


def read_draft_dir(target: LoadedModel, path: str, architecture: str, weights: str) -> DraftDir:
    """Reads `path` (config.json with this architecture, the hidden and vocabulary sizes of the
    target; the safetensors file `weights`)."""
    import json
    import os

    import numpy as np

    from pyserve.model.safetensors import read_header, read_safetensors

    maker = f"tools/train_{architecture}.py"
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a {architecture} directory ({maker} makes one): {e}") from e
    if not isinstance(cfg, dict) or cfg.get("architecture") != architecture:
        raise ValueError(f"{path}/config.json: architecture is not {architecture!r}")
    hidden, vocab = cfg.get("hidden_size"), cfg.get("vocab_size")
    if (hidden, vocab) != (target.config.hidden_size, target.config.vocab_size):
        raise ValueError(f"the {architecture} weights in {path} were made for hidden size {hidden} and {vocab} tokens; "
                         f"the target has {target.config.hidden_size} and {target.config.vocab_size}")
    file = os.path.join(path, weights)
    records = read_safetensors(file, select=lambda name: name != "draft_vocab")
    header, start = read_header(file)
    draft_vocab: list[int] = []
    lm_head = None
    if "draft_vocab" in header:
        # int32 token ids (the weights reader takes float formats only)
        entry = header["draft_vocab"]
        if entry.get("dtype") != "I32":
            raise ValueError(f"{file}: draft_vocab must be I32, got {entry.get('dtype')}")
        begin, end = entry["data_offsets"]
        with open(file, "rb") as f:
            f.seek(start + begin)
            draft_vocab = np.frombuffer(f.read(end - begin), dtype="<i4").tolist()
        if not draft_vocab or min(draft_vocab) < 0 or max(draft_vocab) >= target.config.vocab_size:
            raise ValueError(f"{path}: draft_vocab holds token ids outside [0, {target.config.vocab_size})")
        head = target.tensors.get("lm_head.weight") or target.tensors["model.embed_tokens.weight"]
        rows = np.ascontiguousarray(np.asarray(head.data)[np.asarray(draft_vocab)])
        lm_head = ("lm_head", head.format, rows, (len(draft_vocab), target.config.hidden_size))
    return DraftDir(path, cfg, records, draft_vocab, lm_head)


@dataclasses.dataclass
class MedusaSpec:
    """What `_C.MedusaHeads` is built from (taken before the target's tensors go)."""
    path: str
    num_heads: int
    tensors: list[tuple[str, str, Any, tuple[int, ...]]]
    draft_vocab: list[int]


def medusa_spec(target: LoadedModel, path: str) -> MedusaSpec:
    """A tools/train_medusa.py directory (config.json + medusa.safetensors), checked."""
    d = read_draft_dir(target, path, "medusa", "medusa.safetensors")
    heads = d.config.get("num_heads")
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"{path}/config.json: num_heads must be an integer >= 1, got {heads!r}")
    tensors = [d.tensor(f"medusa.{k}.{part}") for k in range(heads) for part in ("weight", "bias")]
    if d.lm_head is not None:
        tensors.append(d.lm_head)
    return MedusaSpec(path, heads, tensors, d.draft_vocab)


def medusa_heads(c_model: Any, spec: MedusaSpec) -> Any:
    from pyserve import _C

    log.info("medusa: %d heads from %s, draft vocabulary %s", spec.num_heads, spec.path,
             len(spec.draft_vocab) or "the target's")
    return _C.MedusaHeads(c_model, spec.tensors, spec.num_heads, spec.draft_vocab)


def measure_medusa_cost(c_model: Any, heads: Any, repeats: int = 3) -> float:
    """What one Medusa draft costs: the heads over one sequence, per head, relative to the
    target's one-token step."""
    import numpy as np

    hidden = np.random.default_rng(0).standard_normal((1, c_model.config["hidden_size"]), dtype=np.float32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        heads.propose(hidden, heads.num_heads)
        times.append(time.perf_counter() - t0)
    return min(times) / heads.num_heads / step_time(c_model, 1, repeats)


@dataclasses.dataclass
class EagleSpec:
    """What an EAGLE draft is built from (taken before the target's tensors go): its layer as a
    one-layer model (config and tensors, the LM head rows as its tied embedding) and its fc."""
    path: str
    config: dict[str, Any]
    tensors: list[tuple[str, str, Any, tuple[int, ...]]]
    fc: list[tuple[str, str, Any, tuple[int, ...]]]
    draft_vocab: list[int]


# How an EAGLE draft's matrices run: MLC's q8f16_1 (Q8_0 blocks). In float32 its layer alone would
# read 14 MB a draft on the default model, a sixth of what the whole Q4_1 target reads.
EAGLE_SCHEME = "q8f16_1"


def eagle_spec(target: LoadedModel, path: str) -> EagleSpec:
    """A tools/train_eagle.py directory (config.json + eagle.safetensors: model.layers.0.*,
    model.norm.weight, fc.weight, fc.bias, draft_vocab), checked and quantized."""
    from pyserve.model.quantize import quantize_tensors

    d = read_draft_dir(target, path, "eagle", "eagle.safetensors")
    layer = {n: r for n, r in d.records.items() if n.startswith("model.")}
    if "model.norm.weight" not in layer or not any(n.startswith("model.layers.0.") for n in layer):
        raise ValueError(f"{path}/eagle.safetensors: the layer (model.layers.0.*) or its norm is missing")
    layer = quantize_tensors(layer, EAGLE_SCHEME, path)
    fc = quantize_tensors({n: d.records[n] for n in ("fc.weight", "fc.bias") if n in d.records}, EAGLE_SCHEME, path)
    if len(fc) != 2:
        raise ValueError(f"{path}/eagle.safetensors: fc.weight and fc.bias are needed")
    if d.lm_head is not None:
        head = d.lm_head
    else:  # the target's whole LM head
        rec = target.tensors.get("lm_head.weight") or target.tensors["model.embed_tokens.weight"]
        head = ("", rec.format, rec.data, tuple(rec.shape))
    config = dataclasses.asdict(target.config)
    config.update(num_hidden_layers=1, vocab_size=head[3][0], tie_word_embeddings=True, layer_types=None)
    tensors = [(n, r.format, r.data, tuple(r.shape)) for n, r in layer.items()]
    tensors.append(("model.embed_tokens.weight", head[1], head[2], head[3]))
    return EagleSpec(path, config, tensors, [(n, r.format, r.data, tuple(r.shape)) for n, r in fc.items()],
                     d.draft_vocab)


def eagle_draft(c_target: Any, spec: EagleSpec, num_threads: int = 0, isa: str = "auto") -> tuple[Any, Any]:
    """(the draft layer as a one-layer `_C.Model`, its `_C.EagleInput`)."""
    from pyserve import _C

    draft = _C.Model(spec.config, spec.tensors, num_threads, isa)
    log.info("eagle: draft layer from %s, draft vocabulary %s", spec.path, len(spec.draft_vocab) or "the target's")
    return draft, _C.EagleInput(c_target, draft, spec.fc)
