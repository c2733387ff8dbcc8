"""Hugging Face transformers: converted BERT, Llama and GPT-2 (Conv1D) round-trip through nestsparse.hf's
save_pretrained / from_pretrained with bit-identical outputs at every level; what no kernel serves is reported."""

import warnings

import pytest
import torch

import nestsparse
from nestsparse import hf

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need transformers (nestsparse[test])")

SMALL = {
    "bert": lambda: transformers.BertModel(
        transformers.BertConfig(
            vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48
        )
    ),
    "llama": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=48,
        )
    ),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    ),
}


def output(model, ids):
    out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("arch", list(SMALL))
def test_converted_model_round_trips_bit_exact_at_every_level(arch, tmp_path):
    torch.manual_seed(0)
    dense = SMALL[arch]().eval()
    tags = nestsparse.model_tags(dense, (0.5, 0.2, 0.05))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embeddings are reported as left dense (tested below)
        model = nestsparse.convert(dense, tags).eval()
    nested = nestsparse.level_aware_modules(model)
    assert len(nested) == len(tags) > 0
    hf.save_pretrained(model, tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / hf.WEIGHTS_NAME).is_file()
    loaded = hf.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert set(nestsparse.level_aware_modules(loaded)) == set(nested)
    ids = torch.randint(0, 97, (2, 9))
    outs = []
    with torch.no_grad():
        for level in range(3):
            nestsparse.set_level(model, level)
            nestsparse.set_level(loaded, level)
            want = output(model, ids)
            assert torch.equal(output(loaded, ids), want)
            outs.append(want)
    assert not torch.equal(outs[0], outs[2])


def test_gpt2_conv1d_converts_and_its_tied_head_stays_tied():
    torch.manual_seed(1)
    dense = SMALL["gpt2"]().eval()
    tags = nestsparse.model_tags(dense, (0.5, 0.2))
    assert {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= set(tags)
    assert "lm_head" not in tags  # tied to the token embedding: converting it would untie them
    assert tags["transformer.h.0.attn.c_attn"].shape == dense.transformer.h[0].attn.c_attn.weight.shape  # (in, out)
    with pytest.warns(UserWarning, match=r"left dense, no nested kernel for them: 2 Embedding \(transformer.wte"):
        model = nestsparse.convert(dense, tags).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, nestsparse.NestedSparseLinear) and (c_attn.in_features, c_attn.out_features) == (32, 96)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        for level in range(2):
            nestsparse.set_level(model, level)
            torch.testing.assert_close(output(model, ids), output(nestsparse.to_dense(model, level), ids))
        nestsparse.set_level(model, 0)
        # level 0 keeps half of each Conv1D: its product is the dense layer's with the dropped weights zeroed
        ref = dense.transformer.h[0].attn.c_attn
        x = torch.randn(3, 32)
        kept = ref.weight * (tags["transformer.h.0.attn.c_attn"] >= 0)
        torch.testing.assert_close(c_attn(x), x @ kept + ref.bias, rtol=1e-5, atol=1e-5)


def test_from_pretrained_names_what_is_missing(tmp_path):
    torch.manual_seed(2)
    dense = SMALL["bert"]().eval()
    dense.save_pretrained(tmp_path)  # a dense transformers directory
    with pytest.raises(nestsparse.CheckpointError, match=r"no nestsparse.safetensors .*model.safetensors"):
        hf.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="expected a transformers PreTrainedModel"):
        hf.save_pretrained(torch.nn.Linear(2, 2), tmp_path)


def test_gpt2_block_tags_are_the_converted_layers_blocks():
    torch.manual_seed(3)
    dense = SMALL["gpt2"]().eval()
    tags = nestsparse.model_tags(dense, (0.5, 0.25), structure="bcr", block_shape=(8, 16))
    model = nestsparse.convert(dense, tags, format="nbcr", block_shape=(8, 16))  # refused if the blocks were (in, out)
    assert model.transformer.h[0].attn.c_attn.format == "nbcr"
    # the training methods score the same way: weight_tags transposes the layers transformers stores (in, out)
    weights = {"c": dense.transformer.h[0].attn.c_attn.weight}
    scored = nestsparse.pruning.weight_tags(weights, (0.5,), structure="bcr", block_shape=(8, 16), transposed={"c"})
    assert torch.equal(scored["c"], tags["transformer.h.0.attn.c_attn"].clamp(max=0))
