#!/usr/bin/env python3
"""Makes the tiny architecture checkpoints in tests/data/arch/ and their transformers references.

Two steps, so the first runs anywhere (plain Python) and only the second needs torch:

  # 1. byte-level BPE tokenizer.json files: the first 500 ranks of Meta's Llama 3 tiktoken file,
  #    merges derived as transformers' TikTokenConverter derives them, plus special tokens.
  python3 make_arch.py tokenizers --tiktoken ../../../../shared/models/meta-llama-llama3/tokenizer.model --out .

  # 2. checkpoints (random weights, f16 safetensors + config.json) and references, written by
  #    Hugging Face transformers; needs torch, transformers and tokenizers; runs on the CPU.
  python3 make_arch.py models --tokenizers . --out .

Each family folder then holds config.json, model.safetensors (f16), generation_config.json,
tokenizer.json (llama3, qwen2 only), reference.json and logits.f32.

reference.json: the prompt ids (and text, with a tokenizer), the 32 tokens
`model.generate(do_sample=False, max_new_tokens=32)` produces (with EOS stopping disabled),
the seed, library versions and diagnostics. logits.f32: little-endian float32
[len(prompt) + 32, vocab_size], the logits of one forward over prompt + greedy tokens, computed
in float64 from the f16 weights (so row len(prompt)-1 is the prefill's last row and row
len(prompt)-1+i is decode step i).

The random init is scaled so the model is not degenerate; for each family the script tries
seeds 0..SEEDS-1 and keeps the one whose greedy run has the largest top-1/top-2 logit margin
among those with at least MIN_DISTINCT distinct tokens and no EOS, and whose float32 greedy
tokens equal the float64 ones.
"""
import argparse
import array
import base64
import json
import math
import os
import sys
import traceback

SEEDS = 24
MIN_DISTINCT = 8
NEW_TOKENS = 32

# Llama 3 and Qwen2 pre-tokenizer regexes, exactly as their tokenizer.json files spell them.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

RANKS = 500  # byte-level ranks kept from the Llama 3 file (256 bytes + 244 merges)

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
    "<|reserved_special_token_5|>",
    "<|reserved_special_token_6|>",
]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (as tokenizers' ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def tokenizer_json(ranks, pattern, specials, ignore_merges):
    """A tokenizer.json dict: byte-level BPE over `ranks` (bytes -> rank), merges derived as
    transformers' TikTokenConverter does, `specials` as added special tokens after the ranks."""
    b2u = bytes_to_unicode()
    enc = lambda b: "".join(b2u[x] for x in b)
    vocab = {enc(tok): r for tok, r in ranks.items()}
    merges = []
    for tok, r in ranks.items():
        if len(tok) == 1:
            continue
        local = []
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                local.append((left, right, r))
        local.sort(key=lambda x: (ranks[x[0]], ranks[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda x: x[2])
    n = len(ranks)
    added = [{
        "id": n + i,
        "content": s,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    } for i, s in enumerate(specials)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": [f"{enc(a)} {enc(b)}" for a, b, _ in merges],
        },
    }


def make_tokenizers(args):
    ranks = {}
    with open(args.tiktoken, "rb") as f:
        for line in f:
            tok, rank = line.split()
            rank = int(rank)
            if rank >= RANKS:
                break
            ranks[base64.b64decode(tok)] = rank
    assert len(ranks) == RANKS and sorted(ranks.values()) == list(range(RANKS))
    for family, pattern, specials, ignore in [
        ("llama3", LLAMA3_SPLIT, LLAMA3_SPECIALS, True),
        ("qwen2", QWEN2_SPLIT, QWEN2_SPECIALS, False),
    ]:
        d = os.path.join(args.out, family)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tokenizer_json(ranks, pattern, specials, ignore), f, ensure_ascii=False)
        print(f"{family}/tokenizer.json: {RANKS} ranks + {len(specials)} special tokens")


# ---- models ---------------------------------------------------------------------------------

# Each family keeps the features of its real configs at small width and depth:
# llama3: Llama 3.1/3.2 (rope_theta 5e5, llama3 rope_scaling, GQA 4, head_dim 64 given
#   explicitly and != hidden/heads, untied, two EOS ids); original_max_position_embeddings is
#   small (64) so all three frequency bands of the scaling matter at these positions.
# smollm2: SmolLM2 (llama config, tied, GQA 3, rope_theta 1e5).
# mistral: Mistral 7B v0.1 / Nemo (sliding_window 64 < max_position_embeddings 256, explicit
#   head_dim 128 != hidden/heads, GQA 4, untied); prompt + 32 tokens fit in the window.
# qwen2: Qwen2/2.5 (q/k/v biases, tied, rope_theta 1e6, head_dim 64, vocab_size 512 larger than
#   the tokenizer's 503 tokens, use_sliding_window false).
FAMILIES = {
    "llama3": dict(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        bos_token_id=500,
        eos_token_id=[501, 509],
    ),
    "smollm2": dict(
        model_type="llama",
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        intermediate_size=192,
        vocab_size=512,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
    ),
    "mistral": dict(
        model_type="mistral",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=128,
        intermediate_size=96,
        vocab_size=512,
        max_position_embeddings=256,
        sliding_window=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=512,
        sliding_window=512,
        use_sliding_window=False,
        max_window_layers=2,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
        bos_token_id=500,
        eos_token_id=500,
    ),
}

# Prompts: text through the family's tokenizer.json, or fixed ids (BOS first).
PROMPT_TEXT = {
    "llama3": "The year 2024 had 366 days; isn't that odd?",
    "qwen2": "def add(a, b):\n    return a + b  # 12345",
}
PROMPT_IDS = {
    "smollm2": [1, 37, 401, 82, 250, 19, 311, 7, 460, 95, 128, 64, 300, 5, 217, 498, 41, 76, 3],
    "mistral": [1, 265, 43, 381, 12, 77, 490, 150, 9, 333, 208, 61, 444, 18, 120, 402],
}


# Init candidates (output gain of o_proj/down_proj, embedding std * sqrt(hidden)), tried in order
# until a seed gives a non-degenerate model. Untied models need no help. A tied model with a
# plain init repeats its input token (logits = norm(x) . E and x still holds that token's row of
# E), so its layers' outputs are made to dominate the residual stream.
UNTIED_INITS = [(1.0, None)]
TIED_INITS = [(3.0, 2.0), (6.0, 1.0), (10.0, 1.0)]


def init_weights(model, cfg, gen, torch, out_gain, embed_scale):
    """Random weights scaled so logits have std ~2-3: norms N(1, 0.2^2), linear weights
    N(0, 1/fan_in) (o_proj and down_proj times `out_gain`), biases N(0, 0.5^2), an untied
    embedding N(0, 1) and classifier N(0, 9/hidden), a tied embedding N(0, embed_scale^2/hidden)."""
    d = cfg.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                v = 1.0 + 0.2 * r
            elif name.endswith(".bias"):
                v = 0.5 * r
            elif "embed_tokens" in name:
                v = r * (embed_scale / math.sqrt(d) if cfg.tie_word_embeddings else 1.0)
            elif "lm_head" in name:
                v = r * (3.0 / math.sqrt(d))
            else:
                v = r / math.sqrt(p.shape[1])
                if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                    v = v * out_gain
            p.copy_(v.to(p.dtype))


def greedy(model, prompt, torch, transformers):
    """32 tokens of model.generate(do_sample=False) with EOS stopping disabled."""
    gc = transformers.GenerationConfig(
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=None,
    )
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    toks = out[0, len(prompt):].tolist()
    assert len(toks) == NEW_TOKENS, f"generate gave {len(toks)} tokens"
    return toks


def check_saved(name, spec, out, model):
    """The saved config.json keeps theta, scaling, head_dim and window, and the projections have
    the shapes they imply (an older transformers could silently drop a field)."""
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)
    rp = saved.get("rope_parameters") or {}
    theta = saved.get("rope_theta", rp.get("rope_theta"))
    assert theta == spec["rope_theta"], f"{name}: rope_theta saved as {theta}"
    if "rope_scaling" in spec:
        rs = saved.get("rope_scaling") or rp
        assert rs.get("rope_type", rs.get("type")) == "llama3", f"{name}: scaling lost: {rs}"
        for k, v in spec["rope_scaling"].items():
            assert rs.get(k) == v, f"{name}: rope scaling {k} saved as {rs.get(k)}"
    if "sliding_window" in spec:
        want = (spec["sliding_window"],) if spec["model_type"] == "mistral" else (
            spec["sliding_window"], None)
        assert saved.get("sliding_window") in want, f"{name}: sliding_window lost"
    hd = spec.get("head_dim", spec["hidden_size"] // spec["num_attention_heads"])
    att = model.model.layers[0].self_attn
    assert att.q_proj.weight.shape[0] == spec["num_attention_heads"] * hd, f"{name}: q_proj"
    assert att.k_proj.weight.shape[0] == spec["num_key_value_heads"] * hd, f"{name}: k_proj"
    assert (att.q_proj.bias is not None) == (spec["model_type"] == "qwen2"), f"{name}: bias"


def make_family(name, spec, args, torch, transformers, tokenizers):
    out = os.path.join(args.out, name)
    os.makedirs(out, exist_ok=True)
    kw = dict(spec)
    model_type = kw.pop("model_type")
    info = {"family": name, "transformers": transformers.__version__,
            "torch": torch.__version__}
    tok_path = os.path.join(args.tokenizers, name, "tokenizer.json")
    if name in PROMPT_TEXT:
        tk = tokenizers.Tokenizer.from_file(tok_path)
        text = PROMPT_TEXT[name]
        ids = tk.encode(text, add_special_tokens=False).ids
        prompt = ([kw["bos_token_id"]] if name == "llama3" else []) + ids
        info["prompt_text"] = text
        info["prompt_bos"] = name == "llama3"
        if os.path.abspath(os.path.dirname(tok_path)) != os.path.abspath(out):
            with open(tok_path, "rb") as f, open(os.path.join(out, "tokenizer.json"), "wb") as g:
                g.write(f.read())
    else:
        tk = None
        prompt = PROMPT_IDS[name]
    eos = kw["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    cfg = transformers.AutoConfig.for_model(model_type, **kw)
    cfg._attn_implementation = "eager"

    best = None
    for out_gain, embed_scale in TIED_INITS if cfg.tie_word_embeddings else UNTIED_INITS:
        for seed in range(SEEDS):
            gen = torch.Generator().manual_seed(seed)
            m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
            init_weights(m, cfg, gen, torch, out_gain, embed_scale)
            m = m.half().double().eval()  # f16-rounded weights, f64 math
            toks = greedy(m, prompt, torch, transformers)
            toks32 = greedy(m.float(), prompt, torch, transformers)
            m = m.double()
            with torch.no_grad():
                logits = m(torch.tensor([prompt + toks])).logits[0]
            steps = logits[len(prompt) - 1:len(prompt) - 1 + NEW_TOKENS]
            top2 = torch.topk(steps, 2, dim=-1).values
            margin = float((top2[:, 0] - top2[:, 1]).min())
            distinct = len(set(toks))
            ok = toks == toks32 and distinct >= MIN_DISTINCT and not (eos & set(toks))
            print(f"{name} gain {out_gain} embed {embed_scale} seed {seed}: distinct {distinct}, "
                  f"min margin {margin:.4f}, f32==f64 {toks == toks32}, "
                  f"eos {bool(eos & set(toks))}, ok {ok}")
            if ok and (best is None or margin > best[1]):
                best = ((seed, out_gain, embed_scale), margin)
        if best is not None:
            break
    if best is None:
        raise RuntimeError(f"{name}: no seed in 0..{SEEDS - 1} gives a non-degenerate model")
    seed, out_gain, embed_scale = best[0]
    gen = torch.Generator().manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    init_weights(m, cfg, gen, torch, out_gain, embed_scale)
    m = m.half()
    m.save_pretrained(out)
    if tk is None and os.path.exists(os.path.join(out, "tokenizer.json")):
        os.remove(os.path.join(out, "tokenizer.json"))

    check_saved(name, spec, out, m)

    # References from the saved folder, as a user would load it.
    m = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    m = m.double().eval()
    if cfg.tie_word_embeddings:
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(), "not tied"
    toks = greedy(m, prompt, torch, transformers)
    toks32 = greedy(m.float(), prompt, torch, transformers)
    assert toks == toks32, f"{name}: f32 and f64 greedy tokens differ after reload"
    m = m.double()
    seq = torch.tensor([prompt + toks])
    with torch.no_grad():
        logits = m(seq).logits[0]
        logits32 = m.float()(seq).logits[0].double()
    steps = logits[len(prompt) - 1:len(prompt) - 1 + NEW_TOKENS]
    top2 = torch.topk(steps, 2, dim=-1).values
    assert steps.argmax(-1).tolist() == toks, f"{name}: argmax of the full forward != greedy"
    info.update({
        "class": type(m).__name__,
        "seed": seed,
        "init": {"out_gain": out_gain, "embed_scale": embed_scale},
        "prompt": prompt,
        "greedy": toks,
        "logits_file": "logits.f32",
        "logits_rows": len(prompt) + NEW_TOKENS,
        "vocab_size": cfg.vocab_size,
        "greedy_min_margin": float((top2[:, 0] - top2[:, 1]).min()),
        "logits_std": float(logits.std()),
        "f32_vs_f64_max_abs": float((logits32 - logits).abs().max()),
    })
    if tk is not None:
        try:
            info["greedy_text"] = tk.decode(toks, skip_special_tokens=False)
        except Exception as e:  # ids past the tokenizer (qwen2's padded rows)
            print(f"{name}: decode failed: {e}")
    flat = array.array("f", logits.to(torch.float32).flatten().tolist())
    if sys.byteorder != "little":
        flat.byteswap()
    with open(os.path.join(out, "logits.f32"), "wb") as f:
        flat.tofile(f)
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    with open(os.path.join(out, "config.json")) as f:
        print(f"{name}/config.json: {f.read()}")
    print(f"{name}: {json.dumps(info)}")


def make_models(args):
    import torch
    import transformers
    import tokenizers
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    torch.use_deterministic_algorithms(True)
    failed = []
    for name, spec in FAMILIES.items():
        if args.only and name not in args.only:
            continue
        try:
            make_family(name, spec, args, torch, transformers, tokenizers)
        except Exception:  # one family's failure must not lose the others
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"FAILED: {' '.join(failed)}")
        sys.exit(1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizers")
    t.add_argument("--tiktoken", required=True, help="Meta's Llama 3 tokenizer.model")
    t.add_argument("--out", required=True)
    m = sub.add_parser("models")
    m.add_argument("--tokenizers", required=True, help="folder with <family>/tokenizer.json")
    m.add_argument("--out", required=True)
    m.add_argument("--only", nargs="*", help="families to make (default: all)")
    args = p.parse_args()
    make_tokenizers(args) if args.cmd == "tokenizers" else make_models(args)


if __name__ == "__main__":
    main()
