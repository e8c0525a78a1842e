#!/usr/bin/env python3
"""Train Switchyard's default model: a tiny Qwen3-MoE (transformers `Qwen3MoeForCausalLM`) on English
prose and Python code found on the machine, with its own byte-level BPE tokenizer and a ChatML template.

Usage (CPU is enough; about 25 minutes of training on 2 cores):

    python3 -m venv /work/py-train
    /work/py-train/bin/pip install -r scripts/train-requirements.txt
    nice -n 15 /work/py-train/bin/python scripts/train-default-model.py --out models/tiny-moe --minutes 25

Options: --minutes (training wall clock, the LR schedule follows elapsed time), --threads (torch threads,
default 1: on the 2-core dev machine, shared with Rust builds, one thread ran twice as fast as two; use 2 on
an idle machine), --seed, --vocab (BPE vocab size), --seq (training window), --batch, --lr, --no-apt
(do not try `apt-get install fortunes` when the fortune files are missing), --probe (time a few steps
and exit), --dtype (float32 or bf16 autocast for training compute).

Data (nothing is downloaded; the corpus is built from machine paths and never written to the repo):
  prose: Debian's `fortunes` files (/usr/share/games/fortunes), Python's language-reference topics
         (pydoc_data.topics), text files under /usr/share/doc (README/*.txt/*.md/*.rst), and man pages
         (/usr/share/man, roff markup stripped).
  code:  the Python standard library's source (sysconfig stdlib, *.py, tests excluded).
  chat:  ChatML conversations built from training fortunes and standard-library functions.
Held-out splits are whole files (whole fortunes), chosen by a stable hash of their name, and are never
trained on; the script reports perplexity on held-out prose and held-out code separately.

Writes into --out: config.json, generation_config.json, model.safetensors (bf16), tokenizer.json,
tokenizer_config.json (with chat_template), special_tokens_map.json, expected.safetensors +
expected.json (reference logits/greedy tokens, same format as shared/fixtures/gen_fixtures.py),
metrics.json and README.md.
"""
import argparse, ast, glob, gzip, hashlib, json, math, os, random, re, subprocess, sys, sysconfig, time

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
FORTUNE_ASKS = ["Tell me a fortune", "Tell me a fortune.", "Give me a fortune.", "Say something wise.",
                "Tell me something interesting.", "Tell me a joke.", "Give me a quote.", "Hello!",
                "What do you have for me today?", "Can you tell me a story?", "Share a thought."]
CODE_ASKS = ["Write a Python function.", "Show me some Python code.", "Write a function in Python.",
             "Give me an example of Python code.", "Write some code."]
SYSTEM = "You are a helpful assistant."
EVAL_WINDOWS = 4000  # held-out windows for the final perplexity (enough for the whole held-out splits)
N_NEW = 8  # expected.safetensors: greedy tokens per prompt, as gen_fixtures.py


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def held(name, pct):
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 100 < pct


def ascii_ratio(s):
    return sum(c < 128 for c in s.encode("utf-8", "replace")) / max(1, len(s))


# ---------------------------------------------------------------- corpus
def fortunes(allow_apt):
    d = "/usr/share/games/fortunes"
    if not os.path.isdir(d) and allow_apt and os.geteuid() == 0:
        log("fortunes missing; trying apt-get install fortunes")
        subprocess.run(["apt-get", "install", "-y", "-q", "fortunes"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    out = []
    for f in sorted(glob.glob(os.path.join(d, "*"))):
        if "." in os.path.basename(f) or not os.path.isfile(f):
            continue
        try:
            text = open(f, encoding="utf-8", errors="replace").read()
        except OSError:
            continue
        for e in text.split("\n%\n"):
            e = e.strip("\n%")
            if 10 < len(e) < 1200 and ascii_ratio(e) > 0.97:
                out.append(e)
    return out


ROFF_ESC = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\s[+-]?\d"), ""),
            (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\\((em|en)"), " - "),
            (re.compile(r"\\\((lq|rq|dq)"), '"'), (re.compile(r"\\\((oq|cq|aq)"), "'"),
            (re.compile(r"\\\(bu"), "*"), (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),
            (re.compile(r"\\-"), "-"), (re.compile(r"\\e"), "\\\\"), (re.compile(r"\\[&|^%c:]"), ""),
            (re.compile(r"\\ "), " "), (re.compile(r"\\[0~]"), " ")]
ROFF_KEEP = {"SH", "SS", "B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "TP", "IP", "SM", "SB", "Nm", "Nd",
             "Sh", "Ss", "Pp", "It", "Fl", "Ar", "Xr", "Dq", "Qo", "Pa", "Li", "Em", "Sy", "Cm", "Op"}


def strip_roff(src):
    lines = []
    for ln in src.split("\n"):
        if ln.startswith(('.\\"', "'\\\"", '.\\}', "'")):
            continue
        if ln.startswith("."):
            parts = ln[1:].strip().split(None, 1)
            if not parts:
                continue
            if parts[0] in ("SH", "SS", "Sh", "Ss"):
                lines.append("")
            if parts[0] in ROFF_KEEP and len(parts) > 1:
                ln = parts[1].replace('"', "")
            elif parts[0] in ("PP", "LP", "P", "Pp", "sp", "br"):
                lines.append("")
                continue
            else:
                continue
        for rx, rep in ROFF_ESC:
            ln = rx.sub(rep, ln)
        lines.append(ln)
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    return text


def man_pages(max_bytes):
    files = []
    for sec in ("1", "5", "7", "8", "3"):
        files += sorted(glob.glob(f"/usr/share/man/man{sec}/*.gz"))
    random.Random(7).shuffle(files)
    docs, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        try:
            src = gzip.open(f, "rt", encoding="utf-8", errors="replace").read()
        except (OSError, EOFError):
            continue
        if src.startswith(".so ") or len(src) < 800:
            continue
        t = strip_roff(src)
        if len(t) > 400 and ascii_ratio(t) > 0.97:
            docs.append((f, t[:60000]))
            total += len(t[:60000])
    return docs


def share_doc(max_bytes):
    pats = ["*.txt", "*.md", "*.rst", "README*", "NEWS", "FAQ*", "*.text"]
    files = set()
    for p in pats:
        files.update(glob.glob("/usr/share/doc/**/" + p, recursive=True))
    files = sorted(f for f in files if os.path.isfile(f) and not f.endswith((".gz", ".html", ".py")))
    random.Random(8).shuffle(files)
    docs, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        try:
            sz = os.path.getsize(f)
            if sz < 600 or sz > 400_000:
                continue
            t = open(f, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError):
            continue
        if ascii_ratio(t) > 0.97:
            docs.append((f, t))
            total += len(t)
    return docs


def python_topics():
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [("pydoc:" + k, v) for k, v in sorted(topics.items()) if len(v) > 200]


def stdlib_code(max_bytes):
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for f in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(f, root)
        parts = rel.split(os.sep)
        if any(p in ("site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3") for p in parts):
            continue
        if parts[0].startswith(("test_", "_pydev")) or rel.startswith(("pydoc_data", "encodings")):
            continue
        files.append((rel, f))
    random.Random(9).shuffle(files)
    docs, total = [], 0
    for rel, f in files:
        if total >= max_bytes:
            break
        try:
            t = open(f, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError):
            continue
        if 300 < len(t) < 300_000 and ascii_ratio(t) > 0.98:
            docs.append(("py:" + rel, t))
            total += len(t)
    return docs


def functions_of(src, rng, limit=6):
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return []
    lines = src.split("\n")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.col_offset == 0 and node.end_lineno:
            n = node.end_lineno - node.lineno + 1
            if 3 <= n <= 25:
                out.append("\n".join(lines[node.lineno - 1:node.end_lineno]))
    rng.shuffle(out)
    return out[:limit]


def build_corpus(a):
    log("building corpus")
    rng = random.Random(a.seed)
    fort = fortunes(not a.no_apt)
    fort_train = [f for f in fort if not held("fortune:" + f, 5)]
    fort_held = [f for f in fort if held("fortune:" + f, 5)]
    prose = python_topics() + share_doc(a.doc_mb * 1_000_000) + man_pages(a.man_mb * 1_000_000)
    prose_train = [t for n, t in prose if not held(n, 4)] + fort_train
    prose_held = [t for n, t in prose if held(n, 4)] + fort_held
    code = stdlib_code(a.code_mb * 1_000_000)
    code_train_named = [(n, t) for n, t in code if not held(n, 5)]
    code_train = [t for _, t in code_train_named]
    code_held = [t for n, t in code if held(n, 5)]
    chats = []
    def conv(user, answer):
        s = ""
        if rng.random() < 0.3:
            s += f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        return s + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    for f in fort_train:
        chats.append(conv(rng.choice(FORTUNE_ASKS), f))
    funcs = [fn for _, t in code_train_named for fn in functions_of(t, rng)]
    for fn in funcs[: len(fort_train) // 3]:
        chats.append(conv(rng.choice(CODE_ASKS), fn))
    rng.shuffle(chats)
    rng.shuffle(prose_train)
    rng.shuffle(code_train)
    c = dict(prose_train=prose_train, prose_held=prose_held, code_train=code_train, code_held=code_held,
             chat_train=chats)
    for k, v in c.items():
        log(f"  {k}: {len(v)} docs, {sum(map(len, v)) / 1e6:.2f} MB")
    return c


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(c, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    def it():
        for k in ("prose_train", "code_train", "chat_train"):
            n = 0
            for t in c[k]:
                yield t
                n += len(t)
                if n > 12_000_000:
                    break
    tok.train_from_iterator(it(), trainer=trainer)
    return tok


def tokenize(tok, docs, eot):
    ids = []
    for i in range(0, len(docs), 256):
        for e in tok.encode_batch(docs[i:i + 256]):
            ids.append(eot)
            ids.extend(e.ids)
    return np.array(ids, dtype=np.uint16)


# ---------------------------------------------------------------- model
def make_config(a, vocab, eos_ids, bos_id):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads, head_dim=a.head_dim, intermediate_size=4 * a.hidden,
        moe_intermediate_size=a.moe_inter, num_experts=a.experts, num_experts_per_tok=a.topk,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=a.max_pos,
        tie_word_embeddings=False, use_sliding_window=False, sliding_window=None, rms_norm_eps=1e-6,
        router_aux_loss_coef=a.aux_coef, output_router_logits=False, bos_token_id=bos_id,
        eos_token_id=eos_ids, pad_token_id=bos_id)
    return cfg


def batch_from(arrays, probs, B, T, gen):
    src = gen.choice(len(arrays), size=B, p=probs)
    rows = []
    for s in src:
        arr = arrays[s]
        i = gen.integers(0, len(arr) - T - 1)
        rows.append(arr[i:i + T])
    return torch.from_numpy(np.stack(rows).astype(np.int64))


@torch.no_grad()
def heldout_ppl(model, arr, T, max_windows, bs=8):
    model.eval()
    n = min(max_windows, (len(arr) - 1) // T)
    starts = np.linspace(0, len(arr) - T - 1, n).astype(np.int64)
    tot, cnt = 0.0, 0
    for i in range(0, n, bs):
        x = torch.from_numpy(np.stack([arr[s:s + T + 1] for s in starts[i:i + bs]]).astype(np.int64))
        logits = model(x[:, :-1], use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        tot += loss.item()
        cnt += x[:, 1:].numel()
    model.train()
    return math.exp(tot / max(cnt, 1))


@torch.no_grad()
def routing_stats(model, data, T, windows=32):
    """Per layer, the fraction of (token, slot) routing choices that go to each expert, on held-out prose and
    code; and the total-variation distance between the two distributions (0: same experts, 1: disjoint)."""
    model.eval()
    k = model.config.num_experts_per_tok
    load = {}
    for split in ("prose", "code"):
        arr = data[split + "_held"]
        starts = np.linspace(0, len(arr) - T - 1, windows).astype(np.int64)
        x = torch.from_numpy(np.stack([arr[s:s + T] for s in starts]).astype(np.int64))
        counts = None
        for i in range(0, windows, 8):
            rl = model(x[i:i + 8], use_cache=False, output_router_logits=True).router_logits
            c = torch.stack([torch.bincount(r.topk(k, dim=-1).indices.reshape(-1), minlength=r.shape[-1])
                             for r in rl]).double()
            counts = c if counts is None else counts + c
        load[split] = (counts / counts.sum(dim=1, keepdim=True))
    tv = (0.5 * (load["prose"] - load["code"]).abs().sum(dim=1)).tolist()
    return dict(expert_load_prose=[[round(v, 4) for v in r] for r in load["prose"].tolist()],
                expert_load_code=[[round(v, 4) for v in r] for r in load["code"].tolist()],
                routing_tv_prose_vs_code=[round(v, 3) for v in tv])


def per_layer_aux(router_logits, k):
    """Switch-style load-balancing loss computed per layer and averaged (1.0 when balanced). transformers'
    own aux loss pools all layers, which lets each layer collapse onto a few experts while the pool stays
    balanced; balancing each layer keeps every expert of every layer in use."""
    losses = []
    for r in router_logits:
        probs = torch.softmax(r.float(), dim=-1)
        e = probs.shape[-1]
        idx = torch.topk(probs, k, dim=-1).indices
        frac = torch.zeros_like(probs).scatter_(1, idx, 1.0).mean(0) / k  # share of routing choices
        losses.append(e * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def save_checkpoint(model, tok_fast, out):
    import copy
    os.makedirs(out, exist_ok=True)
    m = copy.deepcopy(model).to(torch.bfloat16)  # keep the float32 master weights untouched
    m.config.output_router_logits = False
    m.config.dtype = torch.bfloat16
    m.save_pretrained(out, safe_serialization=True)
    del m
    tok_fast.save_pretrained(out)
    # transformers 5 writes the template to chat_template.jinja; loaders that read tokenizer_config.json
    # (older transformers, the Rust side) want it inline too, with a generic tokenizer class.
    p = os.path.join(out, "tokenizer_config.json")
    tc = json.load(open(p))
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["chat_template"] = CHAT_TEMPLATE
    tc["add_bos_token"] = False
    tc["add_eos_token"] = False
    with open(p, "w") as f:
        json.dump(tc, f, indent=2)


def write_expected(out, tok_fast, seed):
    """Reference outputs exactly as shared/fixtures/gen_fixtures.py makes them (for bf16 weights: the
    checkpoint as stored, read back and computed in float32, eager attention)."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    chat = tok_fast.apply_chat_template([{"role": "user", "content": "Tell me a fortune"}], tokenize=False,
                                        add_generation_prompt=True)
    # Real text whose 8 greedy tokens (for the shipped checkpoint) hold no stop token, so a runtime that
    # stops at eos and one that does not agree.
    texts = ["The old man said", "def fibonacci(n):", chat]
    res = {}
    with torch.no_grad():
        for i, t in enumerate(texts):
            ids = torch.tensor([tok_fast(t, add_special_tokens=False)["input_ids"]], dtype=torch.int64)
            n = ids.shape[1]
            logits = ref(ids, use_cache=False).logits[0].float()
            g = ref.generate(ids, max_new_tokens=N_NEW, do_sample=False, min_new_tokens=N_NEW,
                             eos_token_id=None, pad_token_id=0)[0, n:]
            # generate may mask eos (min_new_tokens); the Rust side does plain argmax, so check it.
            cur = ids
            for _ in range(N_NEW):
                nxt = ref(cur, use_cache=False).logits[0, -1].argmax()
                cur = torch.cat([cur, nxt.view(1, 1)], dim=1)
            if not torch.equal(cur[0, n:], g):
                log(f"WARNING: prompt {i}: generate {g.tolist()} != argmax loop {cur[0, n:].tolist()}")
            res[f"prompt_{i}"] = ids[0].contiguous()
            res[f"logits_{i}"] = logits.contiguous()
            res[f"greedy_{i}"] = g.contiguous()
    save_file(res, os.path.join(out, "expected.safetensors"))
    meta = dict(architecture="Qwen3MoeForCausalLM", weights_dtype="bfloat16", prompts=len(texts),
                new_tokens=N_NEW, transformers=transformers.__version__, torch=torch.__version__, seed=seed,
                tolerance="max |logits - expected| / max |expected| < 1e-4 per prompt; greedy tokens equal")
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return ref, texts


SAMPLE_PENALTY, SAMPLE_MIN_NEW = 1.3, 40


def sample(ref, tok_fast, text, n, eos_ids, min_new=0):
    ids = torch.tensor([tok_fast(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        g = ref.generate(ids, max_new_tokens=n, min_new_tokens=min_new, do_sample=False,
                         repetition_penalty=SAMPLE_PENALTY, eos_token_id=eos_ids, pad_token_id=0)[0, ids.shape[1]:]
    return tok_fast.decode(g, skip_special_tokens=False)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models/tiny-moe")
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=20261201)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--moe-inter", type=int, default=192)
    ap.add_argument("--max-pos", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--mix", default="0.55,0.35,0.10", help="prose,code,chat sampling weights")
    ap.add_argument("--dtype", choices=["float32", "bf16"], default="float32",
                    help="training compute: float32, or bf16 autocast (float32 master weights)")
    ap.add_argument("--doc-mb", type=int, default=10)
    ap.add_argument("--man-mb", type=int, default=8)
    ap.add_argument("--code-mb", type=int, default=14)
    ap.add_argument("--no-apt", action="store_true")
    ap.add_argument("--probe", type=int, default=0, help="time this many steps and exit")
    ap.add_argument("--cache", default="", help="directory to cache the tokenized corpus (outside the repo)")
    ap.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    return ap.parse_args(argv)


def main():
    a = parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t_start = time.time()
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer

    cache_ok = a.cache and os.path.exists(os.path.join(a.cache, "tokenizer.json"))
    if cache_ok:
        tok = Tokenizer.from_file(os.path.join(a.cache, "tokenizer.json"))
        data = dict(np.load(os.path.join(a.cache, "data.npz")))
        log("loaded cached corpus from", a.cache)
    else:
        c = build_corpus(a)
        t0 = time.time()
        tok = train_tokenizer(c, a.vocab)
        log(f"tokenizer trained ({tok.get_vocab_size()} tokens) in {time.time() - t0:.0f}s")
        eot = tok.token_to_id("<|endoftext|>")
        data = {k: tokenize(tok, v, eot) for k, v in c.items()}
        if a.cache:
            os.makedirs(a.cache, exist_ok=True)
            tok.save(os.path.join(a.cache, "tokenizer.json"))
            np.savez(os.path.join(a.cache, "data.npz"), **data)
    for k, v in data.items():
        log(f"  {k}: {len(v) / 1e6:.2f} M tokens")
    tok_fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                       pad_token="<|endoftext|>", unk_token=None,
                                       additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                       chat_template=CHAT_TEMPLATE, model_max_length=a.max_pos,
                                       clean_up_tokenization_spaces=False)
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    eos_ids = [im_end, eot]

    cfg = make_config(a, tok.get_vocab_size(), eos_ids, eot)
    cfg._attn_implementation = "sdpa"
    model = transformers.Qwen3MoeForCausalLM(cfg)
    model.config.output_router_logits = True
    model.router_aux_loss_coef = 0.0  # the script adds its own per-layer balance loss (per_layer_aux)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M params ({2 * n_params / 1e6:.1f} MB in bf16)")
    model.generation_config = transformers.GenerationConfig(bos_token_id=eot, eos_token_id=eos_ids,
                                                            pad_token_id=eot, do_sample=False)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    arrays = [data["prose_train"], data["code_train"], data["chat_train"]]
    probs = np.array([float(x) for x in a.mix.split(",")])
    probs /= probs.sum()
    gen = np.random.default_rng(a.seed)
    budget = a.minutes * 60.0
    model.train()
    t_train = time.time()
    step, tokens, last_save, ema = 0, 0, time.time(), None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=(a.dtype == "bf16"))
    while True:
        elapsed = time.time() - t_train
        if a.probe and step >= a.probe:
            dt = elapsed / step
            log(f"probe: {dt:.2f} s/step, {a.batch * a.seq / dt:.0f} tok/s")
            return
        if not a.probe and elapsed >= budget:
            break
        frac = min(1.0, elapsed / budget)
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch_from(arrays, probs, a.batch, a.seq, gen)
        with autocast:
            out = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
        aux = per_layer_aux(out.router_logits, a.topk)
        loss = out.loss + a.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        lm = out.loss.item()
        ema = lm if ema is None else 0.98 * ema + 0.02 * lm
        if step % 25 == 0:
            log(f"step {step} lm {lm:.3f} (ema {ema:.3f}) aux {aux.item():.3f} lr {lr:.2e} "
                f"{tokens / (time.time() - t_train):.0f} tok/s, {elapsed / 60:.1f} min")
        if time.time() - last_save > a.save_every * 60:
            save_checkpoint(model, tok_fast, a.out)
            last_save = time.time()
            log(f"checkpoint at step {step}; heldout ppl prose "
                f"{heldout_ppl(model, data['prose_held'], a.seq, 16):.1f} code "
                f"{heldout_ppl(model, data['code_held'], a.seq, 16):.1f} (16 windows)")
    train_minutes = (time.time() - t_train) / 60
    log(f"training done: {step} steps, {tokens / 1e6:.2f} M tokens, {train_minutes:.1f} min")
    save_checkpoint(model, tok_fast, a.out)
    finish(a, tok_fast, data, eos_ids, n_params, train_minutes, tokens, step)


def finish(a, tok_fast, data, eos_ids, n_params, train_minutes, tokens, step):
    out = a.out
    # tokenizer_config: name the special tokens; chat template inline.
    ref, texts = write_expected(out, tok_fast, a.seed)
    ppl_prose = heldout_ppl(ref, data["prose_held"], a.seq, EVAL_WINDOWS)
    ppl_code = heldout_ppl(ref, data["code_held"], a.seq, EVAL_WINDOWS)
    log(f"held-out ppl (bf16 weights, float32 compute): prose {ppl_prose:.2f}, code {ppl_code:.2f}")
    chat = tok_fast.apply_chat_template([{"role": "user", "content": "Tell me a fortune"}], tokenize=False,
                                        add_generation_prompt=True)
    samples = {"The old man": sample(ref, tok_fast, "The old man", 60, eos_ids, SAMPLE_MIN_NEW),
               "def fibonacci(n):": sample(ref, tok_fast, "def fibonacci(n):", 60, eos_ids, SAMPLE_MIN_NEW),
               "chat: Tell me a fortune": sample(ref, tok_fast, chat, 60, eos_ids)}
    for k, v in samples.items():
        log(f"sample [{k}]: {v!r}")
    metrics = dict(params=n_params, train_minutes=round(train_minutes, 2), tokens_seen=tokens, steps=step,
                   heldout_ppl_prose=round(ppl_prose, 3), heldout_ppl_code=round(ppl_code, 3),
                   heldout_tokens_prose=int(min(EVAL_WINDOWS, (len(data["prose_held"]) - 1) // a.seq) * a.seq),
                   heldout_tokens_code=int(min(EVAL_WINDOWS, (len(data["code_held"]) - 1) // a.seq) * a.seq),
                   train_tokens_available={k: int(len(v)) for k, v in data.items() if k.endswith("train")},
                   seq_len=a.seq, batch=a.batch, lr=a.lr, mix=a.mix, compute=a.dtype, threads=a.threads,
                   seed=a.seed, torch=torch.__version__, transformers=transformers.__version__)
    metrics.update(routing_stats(ref, data, a.seq))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    write_readme(a, out, metrics, samples, texts)


def top_rows(m, n=3):
    rows = []
    for i, (p, c) in enumerate(zip(m["expert_load_prose"], m["expert_load_code"])):
        fmt = lambda r: ", ".join(f"e{e} {r[e]:.2f}" for e in sorted(range(len(r)), key=lambda e: -r[e])[:n])
        rows.append(f"| {i} | {fmt(p)} | {fmt(c)} |")
    return "\n".join(rows)


def write_readme(a, out, m, samples, texts):
    def block(s):
        return "```\n" + s.replace("```", "` ` `") + "\n```"
    cfg = json.load(open(os.path.join(out, "config.json")))
    s = f"""# tiny-moe: Switchyard's default model

A small Qwen3-MoE (`Qwen3MoeForCausalLM`, {m['params'] / 1e6:.2f} M parameters, bf16 weights) trained from
scratch on English prose and Python code, with its own byte-level BPE tokenizer ({cfg['vocab_size']} tokens)
and a ChatML chat template. It is tiny and undertrained: it writes English-looking text and
Python-looking code, not sense. Its point is real learned routing (with a domain shift between prose and
code) for a checkpoint small enough to live in the repo.

Shape: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, every layer MoE with
{cfg.get('num_experts', cfg.get('num_local_experts'))} experts (top-{cfg['num_experts_per_tok']},
norm_topk_prob, moe_intermediate_size {cfg['moe_intermediate_size']}), {cfg['num_attention_heads']} query heads /
{cfg['num_key_value_heads']} KV heads of head_dim {cfg['head_dim']}, max positions {cfg['max_position_embeddings']},
untied embeddings, rope theta 10000.

## Training
`scripts/train-default-model.py` (retrain: `nice -n 15 /work/py-train/bin/python scripts/train-default-model.py
--out models/tiny-moe --minutes {a.minutes:g}` after `pip install -r scripts/train-requirements.txt`).

- Data, all from the machine: prose = Debian `fortunes`, Python's language-reference topics (pydoc_data),
  text files under /usr/share/doc, man pages (roff stripped); code = the Python {sys.version.split()[0]} standard
  library source (tests excluded); chat = ChatML conversations wrapping training fortunes and stdlib functions.
  Sampling mix prose/code/chat = {m['mix']}. Held-out splits are whole files (whole fortunes) chosen by hash,
  never trained on.
- {m['steps']} steps of batch {m['batch']} x {m['seq_len']} tokens = {m['tokens_seen'] / 1e6:.2f} M tokens seen,
  {m['train_minutes']:.1f} minutes of training on {m['threads']} CPU thread(s) ({m['compute']} compute), AdamW lr {m['lr']:g}
  (warmup, cosine), per-layer router load-balancing loss with coefficient {a.aux_coef:g}.

## Held-out perplexity
(bf16 weights as stored, float32 compute, non-overlapping windows of {m['seq_len']} tokens covering the held-out
splits)

| split | tokens | perplexity |
| --- | --- | --- |
| prose | {m['heldout_tokens_prose']} | {m['heldout_ppl_prose']:.2f} |
| code | {m['heldout_tokens_code']} | {m['heldout_ppl_code']:.2f} |

## Routing
Routing is learned (per-layer load-balancing loss {a.aux_coef:g}) and shifts with the domain: per layer, the total-variation
distance between the experts chosen on held-out prose and on held-out code is
{', '.join(f'{v:.2f}' for v in m['routing_tv_prose_vs_code'])} (0: same mix of experts, 1: disjoint).
The most used experts (share of routing choices) per layer:

| layer | prose | code |
| --- | --- | --- |
{top_rows(m)}

## Samples
Greedy (`do_sample=False`), repetition_penalty {SAMPLE_PENALTY:g}, at most 60 new tokens, stopping at `<|im_end|>` /
`<|endoftext|>`; for the two plain-text prompts the stop tokens are held off for the first {SAMPLE_MIN_NEW} tokens
(`min_new_tokens`), since the model readily ends a short text the way its fortunes end.

Prompt `The old man`:
{block('The old man' + samples['The old man'])}

Prompt `def fibonacci(n):`:
{block('def fibonacci(n):' + samples['def fibonacci(n):'])}

Chat (`[{{"role": "user", "content": "Tell me a fortune"}}]`, add_generation_prompt):
{block(samples['chat: Tell me a fortune'])}

## Tokenizer
Byte-level BPE (`tokenizer.json`: ByteLevel pre-tokenizer without prefix space, ByteLevel decoder, no
normalizer). Special tokens: `<|endoftext|>` = 0 (bos/pad, also the document separator in training),
`<|im_start|>` = 1, `<|im_end|>` = 2 (eos of chat turns). `eos_token_id` in config.json and
generation_config.json is `[2, 0]`. No token is added automatically when encoding.

## Reference outputs
`expected.safetensors` / `expected.json` have the format of `shared/fixtures/gen_fixtures.py`: for 3
prompts (`The old man said`, `def fibonacci(n):`, and the chat prompt above, tokenized with this tokenizer)
`prompt_<i>` (int64), `logits_<i>` (float32, full-sequence logits from one forward, eager attention,
float32 compute) and `greedy_<i>` ({N_NEW} greedy tokens).
"""
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(s)


if __name__ == "__main__":
    main()
