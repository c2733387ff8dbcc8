"""Hugging Face transformers: converted BERT, Llama and GPT-2 (Conv1D) round-trip through nestsparse.hf's
save_pretrained / from_pretrained with bit-identical outputs at every level; what no kernel serves is reported."""

import copy
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

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


# ---- hardening: the directory is checked before anything is built, and nothing in it runs ---------------------------


def convert_quietly(dense, levels=(0.5, 0.2)):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embeddings are left dense
        return nestsparse.convert(dense, nestsparse.model_tags(dense, levels)).eval()


def saved(directory, arch="llama", seed=4):
    """A converted tiny model of ``arch`` and the directory nestsparse.hf.save_pretrained wrote it to."""
    torch.manual_seed(seed)
    model = convert_quietly(SMALL[arch]().eval())
    hf.save_pretrained(model, directory)
    return model, directory


def edit_json(path, change):
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj, indent=2))


def repin(model, directory, class_name=None, pins=("config.json", "generation_config.json"), extra=None):
    """Rewrites the checkpoint so that it pins the config files as they now are (what someone who also rewrites the
    weights file can do: the checksum proves integrity, not origin), recording ``class_name``."""
    metadata = {hf._CLASS_KEY: class_name or type(model).__name__}
    for name in pins:
        if (directory / name).is_file():
            metadata[hf._PINNED[name]] = hf._canonical(json.loads((directory / name).read_text()))
    nestsparse.save(model, directory / hf.WEIGHTS_NAME, metadata={**metadata, **(extra or {})})


SHAPE_KEEPING_EDITS = {  # name: (file, the key named in the refusal, the edit)
    "rms_norm_eps": ("config.json", "rms_norm_eps", lambda c: c.update(rms_norm_eps=1e-2)),
    "hidden_act": ("config.json", "hidden_act", lambda c: c.update(hidden_act="gelu")),
    "tie_word_embeddings": ("config.json", "tie_word_embeddings", lambda c: c.update(tie_word_embeddings=True)),
    "rope_scaling": (
        "config.json",
        "rope_scaling",
        lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    ),
    "rope_theta": ("config.json", "rope_parameters", lambda c: c["rope_parameters"].update(rope_theta=10.0)),
    "added_key": ("config.json", "added_key", lambda c: c.update(added_key=1)),
    "removed_key": ("config.json", "head_dim", lambda c: c.pop("head_dim")),
    "eos_token_id": ("generation_config.json", "eos_token_id", lambda c: c.update(eos_token_id=7)),
    "do_sample": ("generation_config.json", "do_sample", lambda c: c.update(do_sample=True, temperature=3.0)),
}


@pytest.mark.parametrize("edit", list(SHAPE_KEEPING_EDITS))
def test_config_edits_that_keep_shapes_are_refused(edit, tmp_path):
    model, directory = saved(tmp_path)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        want = output(model, ids)
        assert torch.equal(output(hf.from_pretrained(directory), ids), want)  # unedited: loads bit-exact
    name, key, change = SHAPE_KEEPING_EDITS[edit]
    original = (directory / name).read_text()
    edit_json(directory / name, change)
    with pytest.raises(nestsparse.CheckpointError, match=rf"{name}: differs from .*'{key}'"):
        hf.from_pretrained(directory)
    # the same config written another way (indented, keys in another order) is the same config
    (directory / name).write_text(json.dumps(dict(reversed(json.loads(original).items())), indent=4))
    with torch.no_grad():
        loaded = hf.from_pretrained(directory)
        assert torch.equal(output(loaded, ids), want)
    assert loaded.generation_config == model.generation_config


def test_a_missing_generation_config_is_refused_and_an_unpinned_one_ignored(tmp_path):
    _, directory = saved(tmp_path)
    (directory / "generation_config.json").unlink()
    with pytest.raises(nestsparse.CheckpointError, match=r"generation_config.json: missing"):
        hf.from_pretrained(directory)
    _, bert_dir = saved(tmp_path / "bert", "bert")  # BertModel does not generate: nothing pinned, nothing read
    (bert_dir / "generation_config.json").write_text('{"max_length": 3}')
    assert not hf.from_pretrained(bert_dir).can_generate()


EVIL_PY = "import pathlib\npathlib.Path({marker!r}).write_text('imported')\n"
LOAD_SCRIPT = """\
import sys, time
import nestsparse
from nestsparse import hf
for directory in sys.argv[1:]:
    start = time.perf_counter()
    try:
        model = hf.from_pretrained(directory)
        outcome = "loaded " + type(model).__name__
    except nestsparse.CheckpointError as e:
        outcome = "refused " + str(e).replace(chr(10), " ")
    print(f"{time.perf_counter() - start:.2f} {outcome}", flush=True)
"""


def remote_code_directories(tmp_path):
    """Directories whose config.json carries an auto_map to a Python file next to it, which writes a marker file
    if imported: edited after saving (a), edited and pinned with an unknown model_type (b), and pinned with its own
    model_type (c, loadable by transformers' own BertModel without the file)."""
    marker = tmp_path / "marker"
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    dirs = []
    for case in "abc":
        model, directory = saved(tmp_path / case, "bert")
        (directory / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
        model_type = "bert" if case == "c" else "evilnet"
        edit_json(directory / "config.json", lambda c, t=model_type: c.update(auto_map=auto_map, model_type=t))
        if case != "a":
            repin(model, directory)
        dirs.append(directory)
    return marker, dirs


def test_loading_never_runs_code_nor_prompts(tmp_path, monkeypatch):
    marker, dirs = remote_code_directories(tmp_path)
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")  # would answer yes
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 8))
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    for directory, refusal in zip(
        dirs, ("config.json: differs from .*'auto_map', 'model_type'", "model_type 'evilnet'")
    ):
        with pytest.raises(nestsparse.CheckpointError, match=refusal):
            hf.from_pretrained(directory)
    loaded = hf.from_pretrained(dirs[2])  # transformers' BertModel for model_type "bert": the file is not needed
    assert type(loaded) is transformers.BertModel
    assert not asked and not marker.exists()


def test_loading_never_reads_stdin_in_a_fresh_process(tmp_path):
    """With a real stdin that answers "y", and with one that never answers (transformers waits 15 s for it)."""
    marker, dirs = remote_code_directories(tmp_path)
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": os.pathsep.join([str(Path(nestsparse.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    args = [sys.executable, "-c", LOAD_SCRIPT, *map(str, dirs)]
    run = subprocess.run(args, input="y\ny\ny\n", capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["refused", "refused", "loaded"], run.stdout
    silent = subprocess.Popen(
        args[:4], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    try:
        silent.wait(timeout=300)  # its stdin stays open and empty: a prompt would wait for it
        out = silent.stdout.read().split()
    finally:
        silent.kill()
        silent.stdin.close()
        silent.stdout.close()
    assert out[1:2] == ["refused"] and float(out[0]) < 10, out
    assert not marker.exists()


def test_a_config_asking_for_a_huge_model_is_refused_before_anything_is_built(tmp_path):
    """vocab_size 5e7 asks for 12.8 GB of embedding and head (2 x 5e7 x 32 float32)."""
    model, directory = saved(tmp_path)
    edit_json(directory / "config.json", lambda c: c.update(vocab_size=50_000_000))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(nestsparse.CheckpointError, match=r"config.json: differs .*'vocab_size'"):
        hf.from_pretrained(directory)  # edited after saving
    repin(model, directory)
    with pytest.raises(nestsparse.CheckpointError, match=r"skeleton mismatch .*\(97, 32\).*\(50000000, 32\)"):
        hf.from_pretrained(directory)  # pinned too: checked against the skeleton on the meta device
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1 << 20  # less than 1 GiB more


def _hostile_cases():
    """name -> a function that damages a saved BERT directory (given it and the model) and returns the path to load."""

    def write(name, data):
        def damage(d, _):
            (d / name).unlink(missing_ok=True)
            (d / name).write_bytes(data) if isinstance(data, bytes) else (d / name).write_text(data)
            return d

        return damage

    def replace(name, make):
        def damage(d, _):
            (d / name).unlink()
            make(d / name)
            return d

        return damage

    def pinned(change=None, class_name=None, extra=None):
        def damage(d, model):
            if change is not None:
                edit_json(d / "config.json", change)
            repin(model, d, class_name=class_name, extra=extra and extra())
            return d

        return damage

    def loop(p):
        p.symlink_to(p)

    def tail_truncated(d, _):
        data = (d / hf.WEIGHTS_NAME).read_bytes()
        (d / hf.WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
        return d

    def flipped(d, _):
        data = bytearray((d / hf.WEIGHTS_NAME).read_bytes())
        data[-5] ^= 0x40
        (d / hf.WEIGHTS_NAME).write_bytes(bytes(data))
        return d

    def sparse_huge(p):
        with open(p, "wb") as f:
            f.truncate(64 << 20)  # 64 MiB of zeros, no disk

    def no_pin(d, model):
        nestsparse.save(model, d / hf.WEIGHTS_NAME, metadata={hf._CLASS_KEY: type(model).__name__})
        return d

    def another_model(d, model):
        linear = nestsparse.convert(
            torch.nn.Sequential(torch.nn.Linear(8, 8)), {"0": torch.zeros(8, 8, dtype=torch.int8)}
        )
        config = hf._canonical(json.loads((d / "config.json").read_text()))
        nestsparse.save(
            linear, d / hf.WEIGHTS_NAME, metadata={hf._CLASS_KEY: "BertModel", hf._PINNED["config.json"]: config}
        )
        return d

    def dense_save(d, model):
        (d / hf.WEIGHTS_NAME).unlink()
        nestsparse.to_dense(model, 0).save_pretrained(d)
        return d

    config = "config.json"
    return {
        "missing_directory": lambda d, _: d / "nowhere",
        "directory_is_a_file": lambda d, _: d / "config.json",
        "directory_symlink_loop": lambda d, _: (loop(d / "loop"), d / "loop")[1],
        "weights_missing": lambda d, _: ((d / hf.WEIGHTS_NAME).unlink(), d)[1],
        "weights_dense_save": dense_save,
        "weights_a_directory": replace(hf.WEIGHTS_NAME, lambda p: p.mkdir()),
        "weights_symlink_loop": replace(hf.WEIGHTS_NAME, loop),
        "weights_fifo": replace(hf.WEIGHTS_NAME, os.mkfifo),
        "weights_truncated": tail_truncated,
        "weights_garbage": write(hf.WEIGHTS_NAME, bytes(range(256)) * 8),
        "weights_empty": write(hf.WEIGHTS_NAME, b""),
        "weights_bit_flipped": flipped,
        "weights_pin_nothing": no_pin,
        "weights_of_another_model": another_model,
        "pin_not_json": pinned(extra=lambda: {hf._PINNED[config]: "{not json"}),
        "pin_a_list": pinned(extra=lambda: {hf._PINNED[config]: "[1, 2]"}),
        "config_missing": lambda d, _: ((d / config).unlink(), d)[1],
        "config_dangling_symlink": replace(config, lambda p: p.symlink_to(p.parent / "gone.json")),
        "config_truncated": lambda d, _: write(config, (d / config).read_text()[:40])(d, _),
        "config_empty": write(config, ""),
        "config_not_json": write(config, "model_type = bert\n"),
        "config_not_utf8": write(config, b'{"model_type": "b\xe9rt"}'),
        "config_binary": write(config, bytes(range(256))),
        "config_a_list": write(config, "[1, 2, 3]"),
        "config_a_string": write(config, '"bert"'),
        "config_null": write(config, "null"),
        "config_nested_too_deeply": write(config, "[" * 200_000 + "]" * 200_000),
        "config_a_directory": replace(config, lambda p: p.mkdir()),
        "config_symlink_loop": replace(config, loop),
        "config_fifo": replace(config, os.mkfifo),
        "config_dev_zero": replace(config, lambda p: p.symlink_to("/dev/zero")),
        "config_huge_file": replace(config, sparse_huge),
        "config_unknown_model_type": lambda d, _: (edit_json(d / config, lambda c: c.update(model_type="nope")), d)[1],
        "pinned_unknown_model_type": pinned(lambda c: c.update(model_type="nope")),
        "pinned_no_model_type": pinned(lambda c: c.pop("model_type")),
        "pinned_llama_model_type": pinned(lambda c: c.update(model_type="llama")),
        "pinned_hidden_size_a_string": pinned(lambda c: c.update(hidden_size="32")),
        "pinned_hidden_size_negative": pinned(lambda c: c.update(hidden_size=-32)),
        "pinned_heads_not_dividing": pinned(lambda c: c.update(num_attention_heads=3)),
        "pinned_layers_a_list": pinned(lambda c: c.update(num_hidden_layers=[2])),
        "pinned_hidden_act_unknown": pinned(lambda c: c.update(hidden_act="no_such_activation")),
        "class_a_config": pinned(class_name="BertConfig"),
        "class_an_auto_class": pinned(class_name="AutoModel"),
        "class_a_function": pinned(class_name="set_seed"),
        "class_dunder": pinned(class_name="__class__"),
        "class_dotted": pinned(class_name="os.system"),
        "class_unknown": pinned(class_name="NoSuchModel"),
        "class_the_base_class": pinned(class_name="PreTrainedModel"),
        "class_an_abstract_bert": pinned(class_name="BertPreTrainedModel"),
        "class_of_another_model_type": pinned(class_name="GPT2Model"),
        "class_with_another_head": pinned(class_name="BertForMaskedLM"),
        "class_missing": pinned(extra=lambda: {hf._CLASS_KEY: ""}),
    }


HOSTILE = _hostile_cases()


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory):
    torch.manual_seed(5)
    model = convert_quietly(SMALL["bert"]().eval())
    directory = tmp_path_factory.mktemp("bert")
    hf.save_pretrained(model, directory)
    return model, directory


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_directory_ends_in_checkpoint_error(case, saved_bert, tmp_path):
    model, template = saved_bert
    directory = tmp_path / "d"
    shutil.copytree(template, directory)
    path = HOSTILE[case](directory, model)
    start = time.perf_counter()
    with pytest.raises(nestsparse.CheckpointError) as refused:
        hf.from_pretrained(path)
    assert time.perf_counter() - start < 10
    assert str(path) in str(refused.value) or str(directory) in str(refused.value)  # names the file


def test_only_a_bad_model_class_argument_is_a_type_error(saved_bert, tmp_path):
    _, directory = saved_bert
    for bad in (int, transformers.BertConfig, "BertModel", transformers.AutoModel):
        with pytest.raises(TypeError, match="model_class must be a PreTrainedModel subclass"):
            hf.from_pretrained(directory, model_class=bad)
        with pytest.raises(TypeError, match="model_class must be a PreTrainedModel subclass"):
            hf.from_pretrained(tmp_path / "nowhere", model_class=bad)  # the caller's argument, checked first
    assert type(hf.from_pretrained(directory, model_class=transformers.BertModel)) is transformers.BertModel


# ---- the tokenizer, and transformers' own save_pretrained ----------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the", "a", "##s"]


def tiny_tokenizer():
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


def test_save_pretrained_writes_the_tokenizer_given(tmp_path):
    torch.manual_seed(6)
    model = convert_quietly(SMALL["bert"]().eval())
    tokenizer = tiny_tokenizer()
    hf.save_pretrained(model, tmp_path, tokenizer=tokenizer)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True, trust_remote_code=False)
    text = "hello worlds the a"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"] == [2, 5, 6, 9, 7, 8, 3]
    assert type(hf.from_pretrained(tmp_path)) is transformers.BertModel  # model-only, tokenizer files beside it
    with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer"):
        hf.save_pretrained(model, tmp_path, tokenizer="bert-base-uncased")


def test_save_pretrained_writes_the_tokenizer_of_the_directory_the_model_came_from(tmp_path):
    torch.manual_seed(7)
    source = tmp_path / "source"
    SMALL["bert"]().save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    dense = transformers.BertModel.from_pretrained(source).eval()
    assert dense.config._name_or_path == str(source)
    hf.save_pretrained(convert_quietly(dense), tmp_path / "nested")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "nested", local_files_only=True)
    assert again("hello worlds")["input_ids"] == [2, 5, 6, 9, 3]
    # no tokenizer files where it came from: nothing written, no warning
    dense.config._name_or_path = str(tmp_path / "nested" / "nowhere")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf.save_pretrained(convert_quietly(dense), tmp_path / "alone")
    assert not list((tmp_path / "alone").glob("tokenizer*"))


def test_transformers_save_pretrained_is_refused_on_a_converted_model(tmp_path, monkeypatch):
    torch.manual_seed(8)
    dense = SMALL["bert"]().eval()
    model = nestsparse.convert(dense, nestsparse.model_tags(dense, (0.3, 0.1)))
    assert "guard" in repr(model.save_pretrained)  # convert guards what it returns
    assert hf.guard_save_pretrained(model) is model
    with pytest.raises(nestsparse.CheckpointError, match=r"nestsparse\.hf\.save_pretrained\(model, directory\)"):
        model.save_pretrained(tmp_path / "dense")
    assert not (tmp_path / "dense").exists()
    # push_to_hub calls it too, after creating the repository (faked here: nothing may reach the network)
    hub = transformers.utils.hub
    monkeypatch.setattr(
        hub, "hf_api", lambda: types.SimpleNamespace(create_repo=lambda *a, **k: types.SimpleNamespace(repo_id="me/x"))
    )
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: types.SimpleNamespace(save=lambda p: None))
    monkeypatch.setattr(type(model), "_upload_modified_files", lambda *a, **k: pytest.fail("uploaded"), raising=False)
    with pytest.raises(nestsparse.CheckpointError, match=r"nestsparse\.hf\.save_pretrained"):
        model.push_to_hub("me/x")
    # a deep copy is guarded and guards itself; nestsparse.hf's own save and load still work and guard the result
    twin = copy.deepcopy(model)
    assert twin.save_pretrained.model is twin
    with pytest.raises(nestsparse.CheckpointError):
        twin.save_pretrained(tmp_path / "dense")
    hf.save_pretrained(model, tmp_path / "nested")
    loaded = hf.from_pretrained(tmp_path / "nested")
    with pytest.raises(nestsparse.CheckpointError):
        loaded.save_pretrained(tmp_path / "dense")
    # without nested layers (to_dense copies the model and its guard), transformers saves it as usual
    dense_again = nestsparse.to_dense(model, 0)
    dense_again.save_pretrained(tmp_path / "dense")
    reloaded = transformers.BertModel.from_pretrained(tmp_path / "dense").eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(output(reloaded, ids), output(dense_again.eval(), ids))
    # a dense transformers model, or any other model, is left as it is
    assert "save_pretrained" not in vars(hf.guard_save_pretrained(dense))


def test_guard_does_not_import_transformers_for_other_models():
    script = (
        "import sys, torch, nestsparse\n"
        "from nestsparse import hf\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
        "m = nestsparse.convert(m, {'0': torch.zeros(8, 8, dtype=torch.int8)})\n"
        "assert hf.guard_save_pretrained(m) is m and 'save_pretrained' not in vars(m)\n"
        "print('transformers' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr
