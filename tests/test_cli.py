"""Command-line behaviour that needs a real process: exit codes and one-line errors without tracebacks."""
import json
import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-c", "import sys; from relicv2.cli import train_main; sys.exit(train_main())", *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("args, needle", [
    (["--preset", "huge"], "allowed: paper, demo, tiny"),
    (["--set", "loss.alpah=0.5"], "did you mean 'alpha'"),
    (["--set", "train.batch_size=abc"], "'train.batch_size' expects an int"),
    (["--set", "train.batch_size=0.5"], "'train.batch_size' expects an int"),
    (["--set", "loss.objective=simsiam"], "one of 'relicv2', 'infonce', 'byol', 'simclr'"),
    (["--set", "alpha=0.5"], "did you mean loss.alpha=0.5?"),
    (["--config", "missing.yaml"], "does not exist"),
    # values of the right type that cannot work: refused with the field and its range, before any work
    (["--set", "train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
    (["--set", "train.ckpt_every=0"], "train.ckpt_every must be >= 1"),
    (["--set", "train.log_every=0"], "train.log_every must be >= 1"),
    (["--set", "train.keep_last=-1"], "train.keep_last must be >= 1, got -1"),
    (["--set", "data.image_size=0"], "data.image_size must be >= 1"),
    (["--set", "optim.base_lr=1e300"], "optim.base_lr must be in [0.0, 100.0]"),
    (["--set", "loss.tau=1e-8"], "loss.tau must be in [0.01, 100.0]"),
    (["--set", "heads.projector_out=0"], "heads.projector_out must be >= 1"),
    (["--set", "data.synthetic_train=-3"], "data.synthetic_train must be >= 1"),
    (["--set", "eval.protocol=official"], "one of 'features', 'augmented'"),
    (["--set", "eval.crop_fraction=0"], "eval.crop_fraction must be in (0, 1]"),
    (["--set", "views.large_scale=0.5,0.2"], "views.large_scale must be a pair lo,hi with 0 < lo <= hi <= 1"),
    (["--set", "optim.momentum=nan"], "optim.momentum must be finite"),
    # silent no-ops once (exit 0, an empty run directory): refused
    (["--max-steps", "0"], "--max-steps must be >= 1 (steps in total"),
    (["--max-steps", "-3"], "--max-steps must be >= 1 (steps in total, the resumed ones included), got -3"),
    (["--resume", "/nowhere/step_0000002.pt"], "--resume '/nowhere/step_0000002.pt' does not exist; give a checkpoint file"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    r = run(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("relicv2-train: error:") and needle in lines[0], lines[0]


def test_config_file_then_set_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text("preset: tiny\nloss:\n  alpha: 0.25\n  tau: 0.3\n")
    r = run("--config", str(tmp_path / "run.yaml"), "--set", "loss.tau=0.1", "--print-config")
    assert r.returncode == 0, r.stderr
    assert "alpha: 0.25" in r.stdout and "tau: 0.1" in r.stdout and "width: 0.0625" in r.stdout


def test_bad_config_file_names_the_field(tmp_path):
    (tmp_path / "run.json").write_text('{"loss": {"alpha": "lots"}}')
    r = run("--config", str(tmp_path / "run.json"))
    assert r.returncode == 2 and "'loss.alpha' expects a float" in r.stderr, r.stderr
    (tmp_path / "latin1.yaml").write_bytes("train:\n  out_dir: runs/caf\xe9\n".encode("latin-1"))  # not UTF-8
    r = run("--config", str(tmp_path / "latin1.yaml"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"config file {str(tmp_path / 'latin1.yaml')!r} is not UTF-8 text (byte 0xe9 at offset 26)" in r.stderr, r.stderr


def test_no_step_asked_for_makes_no_run_directory(tmp_path):
    r = run("--preset", "tiny", "--max-steps", "0", "--set", f"train.out_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and not (tmp_path / "run").exists(), r.stderr


def command(name, *args):
    return subprocess.run([sys.executable, "-c", f"import sys; from relicv2.cli import {name}; sys.exit({name}())", *args],
                          capture_output=True, text=True, timeout=300)


def one_line(r, code, needle):
    "The command failed with `code` and one error line, the last thing it wrote (after any progress lines)."
    lines = r.stderr.strip().splitlines()
    errors = [l for l in lines if ": error:" in l]
    assert r.returncode == code and len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in r.stderr, r.stderr
    assert needle in errors[0], r.stderr


def test_missing_dataset_folders_are_one_line_in_every_command(tmp_path):
    missing = f"data.dataset=imagefolder:{tmp_path / 'nowhere'}"
    one_line(command("train_main", "--preset", "tiny", "--set", missing, "--set", f"train.out_dir={tmp_path / 'r'}"), 2, "nowhere")
    (tmp_path / "spec.yaml").write_text(f"preset: tiny\nout_dir: {tmp_path / 'grid'}\ncommon: {{data.dataset: 'imagefolder:{tmp_path / 'nowhere'}'}}\n"
                                        "variants: {a: {}}\nbaselines: []\n")
    one_line(command("ablate_main", str(tmp_path / "spec.yaml")), 2, "nowhere")
    (tmp_path / "tree" / "train" / "c").mkdir(parents=True)
    masks = f"data.dataset=imagefolder:{tmp_path / 'tree'},masks={tmp_path / 'no-masks'}"
    one_line(command("train_main", "--preset", "tiny", "--set", masks, "--set", f"train.out_dir={tmp_path / 'r2'}"), 2, "no-masks")


def test_eval_weights_take_either_exported_file_and_misfits_are_one_line(tmp_path):
    run_dir = tmp_path / "run"
    r = command("train_main", "--preset", "tiny", "--set", f"train.out_dir={run_dir}", "--no-eval")
    assert r.returncode == 0, r.stderr
    for f in ("encoder.pt", "encoder_torchvision.pt"):
        r = command("eval_main", "--preset", "tiny", "--weights", str(run_dir / f), "--no-baselines", "--set", "eval.linear_epochs=1")
        assert r.returncode == 0 and "knn_top1" in r.stdout, (f, r.stderr)
    r = command("eval_main", "--preset", "tiny", "--weights", str(run_dir / "encoder_torchvision.pt"), "--set", "encoder.width=0.25")
    one_line(r, 2, "does not fit a resnet18 of width 0.25")
    # a run directory whose config does not describe its weights (was a 118-line traceback): one line, exit 2
    r = command("eval_main", str(run_dir), "--set", "encoder.width=0.25", "--no-progress")
    one_line(r, 2, "step_0000004.pt' does not fit a resnet18 of width 0.25 (small_stem=True) as")
    assert "shapes differ" in r.stderr and "give the encoder.* settings it was trained with" in r.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a weights file")
    one_line(command("eval_main", "--preset", "tiny", "--weights", str(tmp_path / "junk.pt")), 2, "cannot be read as a weights file")


def test_a_train_only_folder_with_masks_trains_monitors_and_says_why_it_does_not_evaluate(tmp_path):
    import torch
    from relicv2.readers import encode_image
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        for i in range(40):
            p = tmp_path / "tree" / "train" / c / f"{i}.png"; p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(encode_image(torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g)))
            m = tmp_path / "masks" / "train" / c / f"{i}.png"; m.parent.mkdir(parents=True, exist_ok=True)
            m.write_bytes(encode_image(torch.full((1, 16, 16), 255, dtype=torch.uint8)))
    ds = f"data.dataset=imagefolder:{tmp_path / 'tree'},masks={tmp_path / 'masks'}"
    r = command("train_main", "--preset", "tiny", "--set", ds, "--set", f"train.out_dir={tmp_path / 'run'}",
                "--set", "train.monitor_steps=2", "--set", "train.epochs=2", "--set", "data.train_subset=48")
    assert r.returncode == 0, r.stderr
    assert "nothing held out to evaluate on" in r.stdout
    rows = [l for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "knn_top1" in l]
    assert rows and all('"train (held-out slice)"' in l for l in rows)
    # relicv2-eval on it: one line that says why (was "splits must be a non-empty subset of , got ()")
    r = command("eval_main", str(tmp_path / "run"), "--no-progress")
    one_line(r, 2, "has no split but train, so nothing held out to evaluate on")



def files_of(folder):
    "{relative path: (modification time in ns, bytes)} of every file under `folder`."
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_run_again_rewrites_nothing_and_reports_its_stored_final_loss(tmp_path):
    import re
    args = ("--preset", "tiny", "--set", f"train.out_dir={tmp_path / 'run'}", "--set", "eval.linear_epochs=2", "--no-progress")
    first = command("train_main", *args)
    assert first.returncode == 0, first.stderr
    before = files_of(tmp_path / "run")
    assert {"config.yaml", "metrics.jsonl", "loss.png", "encoder.pt", "encoder_torchvision.pt", "eval.json"} <= set(before), before.keys()
    again = command("train_main", *args)
    assert again.returncode == 0, again.stderr
    assert files_of(tmp_path / "run") == before  # the same files, bytes and modification times: nothing written again
    loss = re.search(r"4 steps, final loss (\d+\.\d{4})", first.stdout)[1]
    assert f"already finished its 4 steps (final loss {loss}), nothing left to train" in again.stdout, again.stdout
    table = lambda out: out[out.index("knn_top1"):out.index("(accuracy in %")]
    assert table(again.stdout) == table(first.stdout)  # its stored evaluation, printed as the first run printed it
    assert f"evaluation written to {tmp_path / 'run' / 'eval.json'}" in first.stdout
    assert "of its random initial weights (the product of its momenta; 1% or more" in first.stdout  # said what it means
    assert f"evaluation read back from {tmp_path / 'run' / 'eval.json'}, not written again" in again.stdout


def test_ablate_only_a_baseline(tmp_path):
    (tmp_path / "spec.yaml").write_text(f"preset: tiny\nout_dir: {tmp_path / 'grid'}\nvariants: {{a: {{}}}}\n"
                                        "common: {eval.linear_epochs: 1}\n")
    r = command("ablate_main", str(tmp_path / "spec.yaml"), "--only", "raw-pixels")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "grid" / "baselines" / "seed0" / "raw-pixels" / "eval.json").exists()
    assert not (tmp_path / "grid" / "a").exists() and not (tmp_path / "grid" / "baselines" / "seed0" / "random-init").exists()
    one_line(command("ablate_main", str(tmp_path / "spec.yaml"), "--only", "pixels"), 2, "variants: raw-pixels, random-init, a")


def test_ablate_restore_a_committed_table(tmp_path):
    # the baselines' table of one checkout restores into a fresh out_dir: the grid then trains nothing it has
    spec = "preset: tiny\nout_dir: {}\nvariants: {{a: {{}}}}\ncommon: {{eval.linear_epochs: 1}}\n"
    (tmp_path / "first.yaml").write_text(spec.format(tmp_path / "first"))
    (tmp_path / "second.yaml").write_text(spec.format(tmp_path / "second"))
    assert command("ablate_main", str(tmp_path / "first.yaml"), "--only", "raw-pixels").returncode == 0
    r = command("ablate_main", str(tmp_path / "second.yaml"), "--restore", str(tmp_path / "first" / "results.csv"), "--collect")
    assert r.returncode == 0, r.stderr
    assert "restore: 1 finished run(s) restored" in r.stderr, r.stderr
    assert (tmp_path / "first" / "results.csv").read_text() == (tmp_path / "second" / "results.csv").read_text()
    one_line(command("ablate_main", str(tmp_path / "second.yaml"), "--restore", str(tmp_path / "none.csv")), 2, "none.csv")


def test_a_confirmatory_block_runs_only_as_registered_and_committed(tmp_path):
    # 11b_confirm: refused unregistered, refused uncommitted, run once, refused when its seeds change afterwards
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)
    git("init", "-q"); git("config", "user.email", "a@b"); git("config", "user.name", "a")
    block = ("preset: tiny\nout_dir: {}\nseeds: {}\nsplits: [test]\nbaselines: []\nblock: toy\n"
             "common: {{eval.linear_epochs: 1, train.epochs: 1, eval.suites: dense}}\nvariants: {{a: {{}}, b: {{loss.alpha: 0.0}}}}\n"
             "confirm: {{comparisons: [{{a: a, b: b, split: test, margin: 5.0}}, {{a: a, b: b, split: test, margin: 5.0, "
             "metric: dense.miou}}], plan: '4 tiny runs'}}\n")
    spec = tmp_path / "toy.yaml"
    spec.write_text(block.format(tmp_path / "grid", "[0, 1]"))
    one_line(command("ablate_main", str(spec)), 2, "is not registered")
    r = command("ablate_main", str(spec), "--register")
    assert r.returncode == 0 and (tmp_path / "toy.registration.json").exists(), r.stderr
    one_line(command("ablate_main", str(spec)), 2, "commit toy.yaml as it is")
    git("add", "."); git("commit", "-qm", "register")
    r = command("ablate_main", str(spec), "--only", "a")  # half the block: what it measured stays unshown
    assert r.returncode == 0, r.stderr
    assert "block 'toy': 2 of 4 jobs finished" in r.stdout and "linear_top1" not in r.stdout, r.stdout
    assert not list((tmp_path / "grid").glob("*.png"))
    r = command("ablate_main", str(spec))
    assert r.returncode == 0, r.stderr
    v = json.loads((tmp_path / "grid" / "verdicts.json").read_text())["verdicts"]
    assert len(v) == 2 and v[0]["n"] == v[1]["n"] == 2 and v[0]["seeds"] == [0, 1] and "verdict" in v[0] and "p_adj" in v[0]
    assert v[1]["metric"] == "dense.miou" and v[0]["mean"] != v[1]["mean"]  # the second comparison reads the suite's rows
    assert "dense,miou" in (tmp_path / "grid" / "suites.csv").read_text()
    assert "A - B [95% CI]" in r.stdout and v[0]["verdict"] in r.stdout
    r = command("ablate_main", str(spec), "--collect", "--export", str(tmp_path / "committed" / "toy"))  # what a repository keeps
    assert r.returncode == 0, r.stderr
    assert sorted(f.name for f in (tmp_path / "committed").iterdir()) == [
        "toy.csv", "toy.json", "toy.suites.csv", "toy.traces.csv", "toy.verdicts.json"]
    assert (tmp_path / "committed" / "toy.verdicts.json").read_text() == (tmp_path / "grid" / "verdicts.json").read_text()
    spec.write_text(block.format(tmp_path / "grid", "[0, 1, 2]"))  # a seed added after looking
    git("commit", "-qam", "more seeds")
    one_line(command("ablate_main", str(spec)), 2, "a changed block is a new block")
    one_line(command("ablate_main", str(spec), "--register"), 2, "a changed block is a new block")


def test_progress_without_a_terminal_is_a_few_named_lines(tmp_path):
    # stderr is a pipe here, as under nohup or a scheduler: no tqdm bar, but lines that say what runs and how far it is
    r = command("train_main", "--preset", "tiny", "--set", f"train.out_dir={tmp_path / 'run'}", "--set", "eval.linear_epochs=2")
    assert r.returncode == 0, r.stderr
    err = r.stderr.splitlines()
    assert "\r" not in r.stderr and len(err) < 80, r.stderr
    steps = [l for l in err if l.startswith("pretraining: step ")]
    assert err[0].startswith("pretraining: ") and err[0].endswith(" steps"), err[0]
    total = int(err[0].split()[1])
    assert steps[-1].startswith(f"pretraining: step {total}/{total} (100%), loss ") and "img/s" in steps[-1] and steps[-1].endswith(" in all"), steps
    assert 1 <= len(steps) <= 20
    for phase in ("evaluating the raw-pixels baseline", "evaluating the random-init baseline", "evaluating the trained encoder"):
        assert any(l.startswith(f"{phase}: train features") for l in err), (phase, r.stderr)
        assert any(l.startswith(f"{phase}: linear probe") for l in err), (phase, r.stderr)
    # asked for nothing, nothing comes: the same run resumed with progress off through the Python API
    from relicv2.config import preset, update
    from relicv2.train import fit
    import contextlib, io
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        fit(update(preset("tiny"), {"train.out_dir": str(tmp_path / "quiet"), "train.epochs": 1}), max_steps=2, progress=False)
    assert buf.getvalue() == ""


def test_eval_official_sets_the_protocol_and_a_set_still_wins_in_either_order():
    import yaml
    for args in (["--set", "eval.linear_epochs=3", "--official"], ["--official", "--set", "eval.linear_epochs=3"]):
        r = command("eval_main", "--preset", "fashion-mnist", *args, "--print-config")
        assert r.returncode == 0, r.stderr
        e = yaml.safe_load(r.stdout)["eval"]
        assert (e["protocol"], e["linear_solver"], e["linear_epochs"], e["linear_batch_size"], e["linear_base_lr"], e["crop_fraction"]) \
            == ("augmented", "sgd", 3, 1024, 0.3, 0.875), (args, e)


def test_eval_official_keeps_every_row_in_its_state_folder(tmp_path):
    run_dir = tmp_path / "run"
    assert command("train_main", "--preset", "tiny", "--set", f"train.out_dir={run_dir}", "--no-eval").returncode == 0
    quick = ["--official", "--set", "eval.linear_epochs=1", "--set", "eval.linear_batch_size=32", "--splits", "test", "--no-progress"]
    r = command("eval_main", "--preset", "tiny", "--weights", str(run_dir / "encoder.pt"), *quick)
    assert r.returncode == 0 and "linear_top1" in r.stdout and "knn_top1" not in r.stdout, r.stderr
    rows = sorted(p.name for p in (run_dir / "encoder_linear_eval").iterdir())
    assert rows == ["encoder", "random-init", "raw-pixels"]
    assert (run_dir / "encoder_linear_eval" / "encoder" / "probe.pt").is_file()
    r = command("eval_main", str(run_dir), *quick, "--no-baselines", "--state-dir", str(tmp_path / "elsewhere"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "elsewhere" / "trained").iterdir()) == ["features_test.pt", "probe.pt"]
    one_line(command("eval_main", "--preset", "fashion-mnist", "--weights", str(run_dir / "encoder.pt"), "--set", "eval.protocol=augmented",
                     "--set", "data.dataset=synthetic", "--set", "encoder.width=0.0625"), 2, "set eval.linear_solver=sgd")


def test_eval_official_on_an_image_folder_of_mixed_sizes_shows_its_progress(tmp_path):
    import torch
    from relicv2.readers import encode_image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 4)):
        for c, colour in enumerate(((200, 40, 40), (40, 40, 200))):
            (tmp_path / "tree" / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                h, w = 20 + 7 * i, 40 - 5 * i  # no two the same size: the crops make the batch
                img = (torch.tensor(colour, dtype=torch.float)[:, None, None] + 30 * torch.randn(3, h, w, generator=g)).clamp(0, 255).to(torch.uint8)
                p = tmp_path / "tree" / split / f"class{c}" / f"im{i}"
                p.with_suffix(".jpg" if i % 2 else ".png").write_bytes(encode_image(img, "JPEG", quality=95) if i % 2 else encode_image(img))
    run_dir = tmp_path / "run"
    assert command("train_main", "--preset", "tiny", "--set", f"train.out_dir={run_dir}", "--no-eval").returncode == 0
    r = command("eval_main", "--preset", "tiny", "--weights", str(run_dir / "encoder.pt"), "--official", "--no-baselines",
                "--set", f"data.dataset=imagefolder:{tmp_path / 'tree'}", "--set", "eval.linear_epochs=3")
    assert r.returncode == 0, r.stderr
    assert "encoder: val features (centre crops)" in r.stderr and "linear probe on augmented crops (3 epochs): step 3/3" in r.stderr, r.stderr
    header, row = r.stdout.splitlines()[1:3]
    assert header.split() == ["linear_top1"] and row.split()[0] == "encoder", r.stdout  # no kNN with the official protocol


def test_an_error_inside_a_dataloader_worker_is_one_line_naming_the_file(tmp_path):
    import torch
    from relicv2.readers import encode_image
    for c in ("a", "b"):
        (tmp_path / "tree" / "train" / c).mkdir(parents=True)
        for i in range(8):
            (tmp_path / "tree" / "train" / c / f"{i}.png").write_bytes(encode_image(torch.full((3, 16, 16), 30 * i, dtype=torch.uint8)))
    (tmp_path / "tree" / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = command("train_main", "--preset", "tiny", "--set", f"data.dataset=imagefolder:{tmp_path / 'tree'}", "--set", "data.image_size=16",
                "--set", "data.num_workers=1", "--set", f"train.out_dir={tmp_path / 'run'}", "--no-progress")
    one_line(r, 2, "broken.png")
    assert ": error: cannot decode " in r.stderr and "CorruptImageError" not in r.stderr, r.stderr  # the message, whole, without its class
    assert "(in DataLoader worker process 0)" in r.stderr and "Original Traceback" not in r.stderr, r.stderr
