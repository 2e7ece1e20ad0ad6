"""Seeded checks of the field embeddings, the interaction parts and every registered backbone."""

import functools
import inspect
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import synthetic_batch

from tabular2text.schema import FeatureSpec
from towers import BACKBONES, DIN, CTRModel, FieldEmbedding
from towers.interactions import FactorizationMachine, InnerProduct

BATCH_SIZE = 16
SMALL = {"embed_dim": 8, "mlp_dims": [32, 16]}  # as JSON init args would arrive


def build(name, spec, seed=0, **init_args):
    torch.manual_seed(seed)
    return BACKBONES[name](spec, **{**SMALL, **init_args})


def with_padding_replaced(spec, batch, seed=1):
    """The same rows with every padded position of every list field set to a random real id."""
    g = torch.Generator().manual_seed(seed)
    changed = dict(batch)
    for f in spec.fields:
        if f.is_list:
            vocab = spec[f.shares_embedding or f.name].vocab_size
            noise = torch.randint(2, vocab, batch[f.name].shape, generator=g)
            changed[f.name] = torch.where(batch[f.name + "_mask"], batch[f.name], noise)
    return changed


# --- field embeddings and parts --------------------------------------------------------------------------
def test_field_embedding_shares_tables_and_pools_over_mask(spec, batch):
    torch.manual_seed(0)
    emb = FieldEmbedding(spec, 4)
    assert set(emb.tables) == {"user_id", "gender", "item_id", "title", "genres"}  # no own table for history
    out = emb(batch)
    assert out.shape == (8, len(spec.fields), 4)

    slot = spec.names.index("history")
    item_table = emb.tables["item_id"].weight
    for row in range(8):
        ids = batch["history"][row][batch["history_mask"][row]]
        expected = item_table[ids].mean(0) if len(ids) else torch.zeros(4)
        torch.testing.assert_close(out[row, slot], expected)
    age = spec.names.index("age")
    torch.testing.assert_close(out[:, age], batch["age"][:, None] * emb.numeric["age"])
    assert torch.all(emb.tables["genres"].weight[0] == 0)


def test_fm_vector_sums_to_pairwise_dot_products():
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    brute = sum((x[:, i] * x[:, j]).sum(-1) for i in range(5) for j in range(i + 1, 5))
    torch.testing.assert_close(FactorizationMachine()(x).sum(-1), brute)
    pairs = InnerProduct()(x)
    assert pairs.shape == (3, 10)
    torch.testing.assert_close(pairs.sum(-1), brute)


def test_din_needs_a_sequence_sharing_an_item_table(spec):
    no_sequence = spec.with_fields(tuple(f for f in spec.fields if f.kind != "sequence"))
    with pytest.raises(ValueError, match="shares_embedding"):
        DIN(no_sequence)


# --- every backbone --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
def test_shapes_after_rebuild_from_json(name, spec):
    batch = synthetic_batch(spec, BATCH_SIZE)
    tower = build(name, FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict()))))
    assert tower(batch).shape == (BATCH_SIZE, tower.output_dim)
    assert tower.field_embeddings(batch).shape == (BATCH_SIZE, len(spec.fields), SMALL["embed_dim"])
    assert CTRModel(tower)(batch).shape == (BATCH_SIZE,)


@pytest.mark.parametrize("name", BACKBONES)
def test_gradients_reach_used_parameters_only(name, spec):
    batch = synthetic_batch(spec, BATCH_SIZE)
    model = CTRModel(build(name, spec))
    F.binary_cross_entropy_with_logits(model(batch), batch["label"]).backward()

    for param_name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient for {param_name}"

    for embedding in (m for m in model.modules() if isinstance(m, FieldEmbedding)):
        for table_name, table in embedding.tables.items():
            used = set()
            for f in spec.fields:
                if table_name in (f.name, f.shares_embedding):
                    ids = batch[f.name][batch[f.name + "_mask"]] if f.is_list else batch[f.name]
                    used |= set(ids.tolist())
            row_has_grad = table.weight.grad.abs().sum(-1) > 0
            assert set(row_has_grad.nonzero().flatten().tolist()) == used, table_name


@pytest.mark.parametrize("name", BACKBONES)
def test_deterministic_under_seed(name, spec):
    batch = synthetic_batch(spec, BATCH_SIZE)
    first, again, other = (build(name, spec, seed).eval() for seed in (0, 0, 1))
    with torch.no_grad():
        torch.testing.assert_close(first(batch), again(batch), rtol=0, atol=0)
        assert not torch.allclose(first(batch), other(batch))


@pytest.mark.parametrize("name", BACKBONES)
def test_padded_positions_are_ignored(name, spec):
    batch = synthetic_batch(spec, BATCH_SIZE)
    tower = build(name, spec).eval()
    padded = with_padding_replaced(spec, batch)
    assert not torch.equal(padded["history"], batch["history"])
    with torch.no_grad():
        torch.testing.assert_close(tower(padded), tower(batch))
        # a real position does matter: the check above is not vacuous
        real = dict(batch, history=torch.where(batch["history_mask"], batch["history"] % 17 + 2, 0))
        assert not torch.allclose(tower(real), tower(batch))


def test_paper_defaults():
    for cls in BACKBONES.values():
        defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
        assert defaults["embed_dim"] == 32 and tuple(defaults["mlp_dims"]) == (256, 128, 64)
        assert defaults["batch_norm"] and 0 < defaults["dropout"] < 1


def test_a_tower_s_weights_load_into_the_same_backbone_at_any_dropout(spec):
    """Stage 1 at one dropout, stage 2 at another (0 included): the weights' names do not depend on it."""
    for name, cls in BACKBONES.items():
        aligned = cls(spec, embed_dim=8, dropout=0.1).state_dict()
        for dropout in (0.0, 0.5):
            cls(spec, embed_dim=8, dropout=dropout).load_state_dict(aligned)  # strict: raises on any other name
        assert any("deep" in key for key in aligned), name


def test_backbone_config_rebuilds_the_same_tower(spec):
    """From a class, a functools.partial and what jsonargparse builds of a class_path config alike."""
    from collections.abc import Callable

    from jsonargparse import ArgumentParser

    from towers.collaborative import CollaborativeTower, backbone_config, build_backbone

    parser = ArgumentParser()
    parser.add_argument("--backbone", type=Callable[[type(spec)], CollaborativeTower])
    for name, cls in BACKBONES.items():
        tower = cls(spec, embed_dim=8, dropout=0.3)
        parsed = parser.instantiate_classes(parser.parse_object(
            {"backbone": {"class_path": f"towers.{cls.__name__}", "init_args": {"embed_dim": 8, "dropout": 0.3}}}))
        for factory in (functools.partial(cls, embed_dim=8, dropout=0.3), parsed.backbone):
            config = backbone_config(factory)
            assert config["class_path"] == f"towers.collaborative.{cls.__name__}", name
            assert config["init_args"]["embed_dim"] == 8 and config["init_args"]["dropout"] == 0.3
            rebuilt = build_backbone(config, spec)
            assert type(rebuilt) is cls
            assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in tower.parameters()]
        assert backbone_config(cls)["init_args"]["embed_dim"] == 32  # defaults filled in
    assert backbone_config(lambda s: BACKBONES["dcn"](s)) is None
    with pytest.raises(ValueError, match="not in towers and its module is not imported"):
        build_backbone({"class_path": "evil.Backbone", "init_args": {}}, spec)
    with pytest.raises(ValueError, match="is not a towers.CollaborativeTower"):
        build_backbone({"class_path": "towers.mlp.MLP", "init_args": {}}, spec)
