"""The trainer's command line against OpenCLIP's (open_clip_train.params), the published SPARO recipes,
the precision table, OpenCLIP's weight-decay rule and schedules, locking, --torchcompile, start-up errors."""
import argparse
import json
import re
import shlex
import subprocess
import sys
from unittest import mock

import pytest
import torch

from sparo_fast_training import configs, fsdp, optim
from sparo_fast_training.params import build_parser, parse_args

from train_utils import MAIN, env

# ------------------------------------------------------------------ the published recipes
# scripts/*.sh of github.com/ankitkv/sparo-clip: `torchrun --nproc_per_node 1 -m training.main` + these flags
_COMMON = ('--save-frequency 1 --zeroshot-frequency 1 --log-every-n-steps 1 '
           '--train-data "/path/to/cc12m/{00000..01242}.tar::/path/to/cc3m/{00000..00331}.tar" '
           '--train-num-samples 12825420 --logs "/path/to/logs" --dataset-type webdataset '
           '--imagenet-val "/path/to/imagenet/val/" --warmup 3600 --batch-size 512 --wd 0.5 --epochs 25 '
           '--workers 4 --accum-freq 4 --model {model} --name clip_debug --save-most-recent --resume latest '
           '--precision amp_bfloat16 --seed 0 --grad-checkpointing --local-loss --gather-with-grad')
RECIPES = {
    "sparo": _COMMON.replace("{model}", "ViT-B-32-SPARO") + " --max-params 151277313",
    "baseline": _COMMON.replace("{model}", "ViT-B-32"),
    "gap": _COMMON.replace("{model}", "ViT-B-32")
    + """ --override-model-config '{"vision_cfg":{"global_average_pool":true}}'""",
    "bottleneck": _COMMON.replace("{model}", "ViT-B-32")
    + """ --override-model-config '{"bottleneck_dim":512,"embed_dim":4096}'""",
    "codebook": _COMMON.replace("{model}", "ViT-B-32") + """ --override-model-config '{"use_codebook":true}'""",
}
# the variants the model factory builds; the others must stop with one line naming what is missing.
# When a variant lands in sparo_fast.clip, move it here (its recipe then has to run).
SUPPORTED_VARIANTS = ["sparo", "baseline", "gap", "bottleneck", "codebook"]
TINY = {"ViT-B-32-SPARO": "ViT-Tiny-SPARO", "ViT-B-32": "ViT-Tiny"}


def tiny_recipe(name, tmp_path, shards, n):
    """The recipe with only paths, the model size, the batch size and the length changed."""
    argv = shlex.split(RECIPES[name])
    out = []
    i = 0
    while i < len(argv):
        flag, value = argv[i], argv[i + 1] if i + 1 < len(argv) else None
        if flag == "--imagenet-val":  # a path; a 1000-class ImageFolder tree is too slow for a unit test
            i += 2
            continue
        repl = {"--train-data": shards, "--train-num-samples": str(n), "--logs": str(tmp_path),
                "--batch-size": "4", "--model": TINY.get(value)}.get(flag)
        out += [flag, repl] if repl is not None else [flag]
        i += 2 if repl is not None else 1
    return out + ["--fused-sparo", "--device", "cpu", "--threads", "1", "--max-steps", "1"]


def openclip_parser():
    """The parser open_clip_train.params.parse_args builds (captured, not run)."""
    import open_clip_train.params as P

    box = {}

    def capture(self, args=None, namespace=None):
        box["parser"] = self
        raise SystemExit(0)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        with pytest.raises(SystemExit):
            P.parse_args([])
    return box["parser"]


def flags(parser):
    return {o: a for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")}


def test_every_openclip_flag_is_accepted_or_refused_with_a_reason():
    theirs, ours = flags(openclip_parser()), flags(build_parser())
    assert set(theirs) - set(ours) == set(), "OpenCLIP flags this trainer neither accepts nor refuses"
    assert set(configs.REFUSED) <= set(theirs), "refused flags that OpenCLIP does not have"
    assert set(ours) - set(theirs) == configs.PROJECT_FLAGS
    accepted = set(theirs) - set(configs.REFUSED)
    differ = set()
    for f in accepted:
        a, b = theirs[f], ours[f]
        assert a.dest == b.dest and a.nargs == b.nargs, f
        assert (a.const, a.type or str) == (b.const, b.type or str) or type(a).__name__ == "ParseKwargs", f
        if a.choices:
            assert set(a.choices) == set(b.choices), f
        if a.default != b.default:
            differ.add(f)
    assert differ == set(configs.DEFAULTS), "defaults that differ from OpenCLIP's must be listed, and only those"
    assert set(configs.RUNTIME_DEFAULTS) <= accepted
    assert len(accepted) >= 60


@pytest.mark.parametrize("flag", sorted(configs.REFUSED))
def test_refused_flag_stops_with_its_reason(flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([flag])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and configs.REFUSED[flag] in err and flag in err


def test_precision_names_map_to_fsdp2_policies_or_are_refused(capsys):
    choices = set(flags(openclip_parser())["--precision"].choices)
    refused = {v for (f, v) in configs.REFUSED_VALUES if f == "--precision"}
    assert set(fsdp.PRECISIONS) | refused == choices and not set(fsdp.PRECISIONS) & refused
    for name in refused:
        with pytest.raises(SystemExit):
            parse_args(["--precision", name])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "gradient scaler" in err
    for name, p in fsdp.PRECISIONS.items():
        assert parse_args(["--precision", name]).precision == name
        assert ("amp" in name) == (p.autocast is not None)
        assert (name == "pure_bf16") == (p.weights == torch.bfloat16)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_published_recipe_parses(name):
    args = parse_args(shlex.split(RECIPES[name]))
    assert args.precision == "amp_bfloat16" and args.accum_freq == 4 and args.save_most_recent
    assert args.dataset_type == "webdataset" and args.logs == "/path/to/logs" and args.resume == "latest"
    assert (args.max_params is not None) == (name == "sparo")


def test_unknown_model_override_stops_with_one_line_naming_it(tmp_path):
    from sparo_fast_training.trainer import Fatal, Trainer

    argv = tiny_recipe("codebook", tmp_path, "x-{0..1}.tar", 64)
    i = argv.index("--override-model-config")
    argv[i + 1] = '{"use_codebok": true}'
    trainer = Trainer(parse_args(argv))
    trainer.device = torch.device("cpu")
    with pytest.raises(Fatal) as e:
        trainer.build_model()
    msg = str(e.value)
    assert "\n" not in msg and "use_codebok" in msg, msg


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory):
    from sparo_fast_training import synthetic

    d = synthetic.ensure_synthetic(str(tmp_path_factory.mktemp("recipe_data")), 192, 32, shard_size=64,
                                   log=lambda *_: None)
    return synthetic.shard_pattern(d["folder"], "train", 192, 64), 192


@pytest.mark.parametrize("name", SUPPORTED_VARIANTS)
def test_published_recipe_runs(name, tmp_path, synthetic_shards):
    argv = tiny_recipe(name, tmp_path, *synthetic_shards)
    res = subprocess.run([sys.executable, str(MAIN)] + argv, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "clip_debug"
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    assert len(train) == 1 and train[0]["loss"] == train[0]["loss"] and train[0]["lr"] == 5e-4 / 3600
    assert "precision amp_bfloat16" in res.stdout and (run / "checkpoints" / "step_1.pt").is_file()
    params = json.loads((run / "params.json").read_text())
    assert params["model"] == TINY["ViT-B-32-SPARO" if name == "sparo" else "ViT-B-32"]


# ------------------------------------------------------------------ optimiser
DECAYED = [r"(visual\.)?positional_embedding", r"visual\.conv1\.weight", r"token_embedding\.weight",
           r"(visual\.)?transformer\.resblocks\.\d+\.(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|"
           r"mlp\.c_proj\.weight)",
           r"(visual\.sparo|text_sparo)\.(q_emb|k\.weight|v\.weight|proj\.weight)"]


def test_weight_decay_follows_openclip_rule_on_vit_b32_sparo():
    from sparo_fast.clip import create_model

    with torch.device("meta"):
        model = create_model("ViT-B-32-SPARO", fused=True, device="meta")
    opt = optim.create_optimizer(model, lr=1e-3, wd=0.5)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.5 for p in g["params"]}
    kept = {by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed | kept == set(by_id.values()) and not decayed & kept
    expected = {n for n in by_id.values() if any(re.fullmatch(r, n) for r in DECAYED)}
    assert decayed == expected
    # embeddings are decayed (OpenCLIP); gains, biases, class embedding, logit scale are not
    assert {"positional_embedding", "visual.positional_embedding", "token_embedding.weight",
            "visual.sparo.q_emb", "text_sparo.q_emb"} <= decayed
    assert {"visual.class_embedding", "logit_scale", "ln_final.weight", "visual.sparo.k.bias"} <= kept


def test_lr_schedulers_are_openclip_s():
    model = torch.nn.Linear(2, 2)
    for sched, extra in (("cosine", []), ("const", []), ("const-cooldown", ["--epochs-cooldown", "2"])):
        args = parse_args(["--lr-scheduler", sched, "--warmup", "10", "--epochs", "5", "--lr-cooldown-end", "1e-5",
                           *extra])
        opt = optim.create_optimizer(model, 0.1, 0.0)
        f = optim.make_scheduler(args, opt, 0.1, 20, 100)
        lrs = [f(s) for s in range(100)]
        assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1) and opt.param_groups[0]["lr"] == lrs[-1]
        if sched == "const":
            assert set(lrs[9:]) == {0.1}
        elif sched == "cosine":
            assert lrs[-1] < 1e-3 and all(x >= y for x, y in zip(lrs[10:], lrs[11:]))
        else:  # constant until the last 2 epochs (40 steps), then linear to --lr-cooldown-end
            assert set(lrs[10:60]) == {0.1} and lrs[60] == pytest.approx(0.1) and lrs[61] < 0.1
            assert lrs[99] == pytest.approx(1e-5 + (0.1 - 1e-5) / 40)


# ------------------------------------------------------------------ model options
def test_lock_towers_as_openclip():
    from sparo_fast.clip import create_model
    from sparo_fast_training.trainer import Trainer

    def trainable(argv):
        model = create_model("ViT-Tiny-SPARO", fused=True)
        Trainer(parse_args(argv)).lock(model)
        return {n for n, p in model.named_parameters() if p.requires_grad}

    all_ = trainable([])
    img = trainable(["--lock-image"])
    assert not any(n.startswith("visual.") for n in img) and img == {n for n in all_ if not n.startswith("visual.")}
    part = trainable(["--lock-image", "--lock-image-unlocked-groups", "1"])
    assert {n for n in part if n.startswith("visual.")} == {n for n in all_ if n.startswith("visual.sparo.")}
    txt = trainable(["--lock-text"])
    assert txt == {n for n in all_ if n.startswith("visual.") or n == "logit_scale"}
    txt1 = trainable(["--lock-text", "--lock-text-unlocked-layers", "1"])
    assert any(n.startswith("text_sparo.") for n in txt1) and "token_embedding.weight" not in txt1


def test_compiled_training_step_has_no_graph_break():
    """--torchcompile compiles each block and the read-outs; a training step through them breaks no graph
    (so the fused read-out is traced whole) and gives the eager step's loss and gradients."""
    from torch._dynamo.utils import counters
    from sparo_fast.clip import create_model
    from sparo_fast_training.loop import make_loss, train_step
    from sparo_fast_training.trainer import compile_model

    from accuracy import assert_close
    from train_utils import float64_clip_step
    from train_worker import global_batch

    seed = torch.randint(0, 2**31, ()).item()
    print(f"global_batch seed {seed}")
    images, tokens = global_batch(4, seed=seed)
    out = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = create_model("ViT-Tiny-SPARO", fused=True, output_dict=True)
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            compile_model(model, backend="aot_eager")
        opt = optim.create_optimizer(model, lr=1e-3, wd=0.1)
        loss, _ = train_step(model, [(images, tokens)], make_loss(False, False, 0, 1), opt)
        out[compiled] = (loss, {n: p.detach().clone() for n, p in model.named_parameters()},
                         {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 2  # blocks and read-outs were compiled
    # the compiled step's loss and gradients against float64 with accuracy.py's criterion (the eager
    # step as PyTorch's error); then the tolerances the test began with, on the loss and the weights
    loss64, grads64, K, terms = float64_clip_step("ViT-Tiny-SPARO", images, tokens)
    check = dict(dtype=torch.float32, K=K, seed=f"global_batch seed {seed}")
    assert_close("loss", out[True][0], loss64, out[False][0], **check)
    assert out[True][2].keys() == out[False][2].keys() == grads64.keys()
    for n, g in grads64.items():
        assert_close(n, out[True][2][n], g, out[False][2][n], terms=terms.get(n), **check)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    for n, p in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], p, rtol=1e-4, atol=1e-5, msg=n)


# ------------------------------------------------------------------ start-up failures
def test_bad_model_name_leaves_no_run_folder(tmp_path):
    res = subprocess.run([sys.executable, str(MAIN), "--device", "cpu", "--logs", str(tmp_path / "logs"),
                          "--name", "bad", "--model", "ViT-Nope", "--data-cache-dir", str(tmp_path / "cache"),
                          "--synthetic-train-samples", "64", "--synthetic-val-samples", "16",
                          "--synthetic-shard-size", "64"], env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert lines[-1].startswith("error: cannot build model 'ViT-Nope'") and res.stderr.count("\n") == 1, lines
    assert not (tmp_path / "logs").exists()


def test_report_to_without_wandb_is_one_line(tmp_path, monkeypatch):
    from sparo_fast_training import logger

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(logger.ReportError, match="wandb is not installed"):
        logger.MetricsWriter(str(tmp_path), True, "tensorboard,wandb")
    w = logger.MetricsWriter(str(tmp_path), True, "tensorboard")
    w.write("train", 1, {"loss": 1.5})
    w.close()
    assert (tmp_path / "tensorboard").is_dir() and json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 1.5


def test_pretrained_file_and_preprocessing_overrides(tmp_path):
    from sparo_fast.clip import create_model
    from sparo_fast_training.trainer import Trainer

    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    src = create_model("ViT-Tiny-SPARO", fused=True)
    path = tmp_path / "init.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    t = Trainer(parse_args(["--pretrained", str(path), "--image-mean", "0.5", "--image-std", "0.1", "0.2", "0.3"]))
    t.device = torch.device("cpu")
    t.build_model()
    for (n, a), b in zip(src.state_dict().items(), t.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)
    norm = [m for m in t.pre_val.transforms if type(m).__name__ == "Normalize"][0]
    assert tuple(norm.mean) == (0.5, 0.5, 0.5) and tuple(norm.std) == (0.1, 0.2, 0.3)
    with pytest.raises(SystemExit):
        parse_args(["--pretrained", "laion2b_s34b_b79k"])  # a download tag: refused with one line


def test_dataset_resampled_draws_shards_with_replacement_by_source_weight():
    from sparo_fast_training.datasetup import DataPlan
    from sparo_fast_training.trainer import Trainer

    a = [f"a-{i}.tar" for i in range(50)]
    b = [f"b-{i}.tar" for i in range(50)]
    t = Trainer(parse_args(["--dataset-resampled", "--train-data-upsampling-factors", "1::3", "--seed", "7"]))
    t.data = DataPlan([a, b], 100, None, [1.0] * 50 + [3.0] * 50, None)
    draws = []
    for epoch in range(4):
        t.pos.epoch = epoch
        draws.append(t.epoch_urls())
    t.pos.epoch = 0  # deterministic per (seed, epoch)
    assert t.epoch_urls() == draws[0] and draws[0] != draws[1] and all(len(d) == 100 for d in draws)
    picks = [u for d in draws for u in d]
    assert len(set(draws[0])) < 100  # with replacement
    share_b = sum(u.startswith("b-") for u in picks) / len(picks)
    assert 0.65 < share_b < 0.85  # expected 0.75
