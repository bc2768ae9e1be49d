"""The command-line tools as a new user meets them: bad input is one line on stderr and exit code 2
(no traceback), libtpu's host-probing noise is silenced on a host without a TPU, progress is plain
lines in a log, and `autotune show` sorts by value and leaves out empty columns.

The bad-input cases run each tool in a subprocess, as a user would; they are rejected while the
command line is parsed, before any JAX backend starts."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autotune import quiet

ROOT = Path(__file__).resolve().parents[2]
NOISE = ("Failed to find host bounds", "unexpected worker hostname", "Logging before InitGoogle")


def _env(*, cpu: bool = True) -> dict[str, str]:
    """The subprocess's environment: this checkout first on the path, no TPU topology variables."""
    env = {k: v for k, v in os.environ.items() if k not in quiet.TPU_TOPOLOGY_ENV}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if cpu:
        env["JAX_PLATFORMS"] = "cpu"  # the test process may hold libtpu's lock
    else:
        env.pop("JAX_PLATFORMS", None)
        env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # libtpu probes the host even though pytest loaded it too
    return env


def _run(module: str, *args: str, cpu: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          env=_env(cpu=cpu), timeout=timeout)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from engine.make_tiny_model import write_model

    return write_model(tmp_path_factory.mktemp("cli") / "tiny", "llama", dtype="float32", seed=0)


BAD_INPUT = [
    # (module, prog, arguments, words the message must contain)
    ("autotune.cli", "autotune run", ["run", "--chip", "v9", "--model", "llama3-8b"], ["--chip", "'v9'", "v6e"]),
    ("autotune.cli", "autotune show", ["show", "--chip", "tpu-v42"], ["--chip", "'tpu-v42'", "all"]),
    ("autotune.cli", "autotune check", ["check", "--chip", "h100"], ["--chip", "'h100'", "tpu7x"]),
    ("autotune.cli", "autotune run", ["run", "--chip", "v6e", "--kernel", "attn", "--model", "llama3-8b"],
     ["--kernel", "'attn'", "rpa"]),
    ("autotune.cli", "autotune show", ["show", "--chip", "v6e", "--kernel", "attn"], ["--kernel", "'attn'"]),
    ("autotune.cli", "autotune check", ["check", "--kernel", "attn"], ["--kernel", "'attn'"]),
    ("autotune.cli", "autotune run", ["run", "--chip", "v6e", "--model", "llama-9"], ["--model", "'llama-9'"]),
    ("autotune.cli", "autotune run", ["run", "--chip", "v6e", "--shapes", "/nonexistent/keys.json"],
     ["--shapes", "no such file"]),
    ("autotune.cli", "autotune run", ["run", "--chip", "v6e", "--shapes", str(ROOT / "README.md")],
     ["--shapes", "not a JSON file"]),
    ("autotune.cli", "autotune run", ["run", "--chip", "v6e", "--model", "all", "--budget", "0"], ["--budget"]),
    ("autotune.cli", "autotune", ["tune"], ["'tune'"]),
    ("bench.cli", "bench kernels", ["kernels", "--shape-set", "huge"], ["--shape-set", "'huge'", "decode-heavy"]),
    ("bench.cli", "bench kernels", ["kernels", "--kernel", "fused_moe"], ["--kernel", "'fused_moe'"]),
    ("bench.cli", "bench kernels", ["kernels", "--kernel", "rpa", "--shape-set", "moe"],
     ["rpa", "'moe'", "decode-heavy"]),
    ("bench.cli", "bench serve", ["serve", "--base-url", "http://127.0.0.1:9", "--vocab-size", "100",
                                  "--request-rate", "fast"], ["--request-rate", "'fast'"]),
    ("bench.cli", "bench serve", ["serve", "--base-url", "http://127.0.0.1:9", "--vocab-size", "100",
                                  "--dataset", "128x128"], ["--dataset", "IN/OUT"]),
    ("bench.cli", "bench serve", ["serve", "--base-url", "http://127.0.0.1:9"], ["--tokenizer", "--vocab-size"]),
    ("bench.cli", "bench serve", ["serve", "--base-url", "http://127.0.0.1:9", "--vocab-size", "100",
                                  "--cold-start"], ["--cold-start", "--launch"]),
    ("engine.serve", "python -m engine.serve", ["--model", "/nonexistent/model"], ["--model", "does not exist"]),
    ("engine.serve", "python -m engine.serve", ["--model", "/"], ["--model", "config.json"]),
    ("engine.make_tiny_model", "python -m engine.make_tiny_model", ["/tmp/m", "--arch", "gpt2"],
     ["--arch", "'gpt2'", "qwen3"]),
    ("engine.make_tiny_model", "python -m engine.make_tiny_model", ["/tmp/m", "--like", "llama-9"],
     ["--like", "'llama-9'", "llama3-8b"]),
    ("engine.make_tiny_model", "python -m engine.make_tiny_model", ["/tmp/m", "--like", "llama3-8b", "--layers", "2"],
     ["--layers", "--like"]),
    ("engine.demo", "python -m engine.demo", ["--like", "llama-9"], ["--like", "'llama-9'"]),
]


def _assert_one_line_error(res: subprocess.CompletedProcess, prog: str, words: list[str]) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert all(w in lines[0] for w in words), (words, lines[0])
    assert "Traceback" not in res.stderr and res.stdout == ""
    return lines[0]


@pytest.mark.parametrize(("module", "prog", "args", "words"), BAD_INPUT,
                         ids=[f"{m}-{' '.join(a)[:40]}" for m, _, a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_code_2(module, prog, args, words):
    _assert_one_line_error(_run(module, *args), prog, words)


def test_engine_serve_bad_backend_with_a_real_checkpoint(tiny_model):
    res = _run("engine.serve", "--model", str(tiny_model), "--backend", "cuda")
    _assert_one_line_error(res, "python -m engine.serve", ["--backend", "'cuda'", "pallas"])


def test_engine_serve_options_the_engine_refuses_are_one_line(tiny_model):
    """Options that pass the parser but not the engine (too few KV pages for one sequence)."""
    res = _run("engine.serve", "--model", str(tiny_model), "--backend", "reference", "--max-model-len", "256",
               "--page-size", "16", "--num-pages", "2")
    _assert_one_line_error(res, "python -m engine.serve", ["num_pages=2", "max_model_len=256"])


@pytest.mark.parametrize("module", ["autotune.cli", "bench.cli", "engine.serve", "engine.make_tiny_model",
                                    "engine.demo", "bench.demo"])
def test_help_documents_every_option(module):
    res = _run(module, "--help")
    assert res.returncode == 0 and res.stderr == ""
    text = " ".join(res.stdout.split())  # help wraps lines
    assert text.startswith("usage:")
    if module in ("engine.serve", "engine.demo"):
        assert "(default: 4096)" in text or "(default: 512)" in text
        assert "--backend {auto,reference,interpret,pallas}" in text and "(default: auto)" in text


@pytest.mark.parametrize(("module", "sub"), [("autotune.cli", "run"), ("autotune.cli", "show"),
                                             ("autotune.cli", "check"), ("bench.cli", "kernels"),
                                             ("bench.cli", "serve"), ("engine.serve", None),
                                             ("engine.make_tiny_model", None), ("engine.demo", None)])
def test_every_option_has_help(module, sub):
    """In-process: each option of each parser carries a help text."""
    import importlib

    mod = importlib.import_module(module)
    built = mod.build_parser()
    parser = built[0] if isinstance(built, tuple) else built
    if sub is not None:
        parser = next(a for a in parser._actions if a.dest == "cmd").choices[sub]
    missing = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert not missing


# --- libtpu's host-probing noise ------------------------------------------------------------------


@pytest.fixture
def probing_host():
    """Skip where libtpu does not probe (a TPU is attached, or this libtpu prints nothing)."""
    if quiet.tpu_attached():
        pytest.skip("a TPU is attached: libtpu finds its host and prints no probing errors")
    res = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, text=True,
                         env=_env(cpu=False), timeout=120)
    if not any(n in res.stderr for n in NOISE):
        pytest.skip("libtpu prints no host-probing errors on this host")


def test_libtpu_noise_is_silenced_when_a_command_starts_jax(probing_host, tmp_path):
    """`bench kernels` starts JAX's backends (it looks for a device to time on)."""
    res = _run("bench.cli", "kernels", "--kernel", "rpa", "--shape-set", "decode-heavy", "--out", str(tmp_path),
               cpu=False)
    assert res.returncode == 0, res.stderr
    assert not any(n in res.stderr for n in NOISE), res.stderr
    assert res.stderr == ""


def test_libtpu_noise_is_silenced_for_compile_only_topologies(probing_host):
    """The helper, then a compile-only topology (what `autotune run` / `check` start)."""
    code = ("from autotune.quiet import quiet_libtpu; quiet_libtpu(); "
            "from jax.experimental import topologies; "
            "print(len(topologies.get_topology_desc(platform='tpu', topology_name='v5e:1x1').devices))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(cpu=False),
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "1", res.stderr
    assert not any(n in res.stderr for n in NOISE), res.stderr


def test_quiet_libtpu_changes_nothing_on_a_tpu_host_or_a_user_topology(tmp_path):
    assert quiet.quiet_libtpu(env := {}, sys_root=str(tmp_path)) == quiet.SINGLE_HOST_ENV
    assert env == quiet.SINGLE_HOST_ENV and not any("LOG_LEVEL" in k for k in env)  # no log level hidden
    user = {"TPU_ACCELERATOR_TYPE": "v5litepod-8"}
    assert quiet.quiet_libtpu(user, sys_root=str(tmp_path)) == {} and user == {"TPU_ACCELERATOR_TYPE": "v5litepod-8"}
    chip = tmp_path / "sys/bus/pci/devices/0000:00:05.0"
    chip.mkdir(parents=True)
    (chip / "vendor").write_text("0x1ae0\n")
    (chip / "device").write_text("0x006f\n")  # a v6e chip
    assert quiet.tpu_attached(str(tmp_path)) and quiet.quiet_libtpu({}, sys_root=str(tmp_path)) == {}
    (chip / "device").write_text("0x0042\n")  # gVNIC: a Google network card, not a TPU
    assert not quiet.tpu_attached(str(tmp_path))
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "accel0").write_text("")
    assert quiet.tpu_attached(str(tmp_path))


def test_tpu_device_ids_cover_jax():
    """The helper must see every TPU jax sees (jax skips the metadata query only without one)."""
    try:
        from jax._src import hardware_utils
    except ImportError:
        pytest.skip("jax moved its hardware helpers")
    assert set(getattr(hardware_utils, "_TPU_PCI_DEVICE_IDS", {})) <= quiet.TPU_PCI_DEVICE_IDS


# --- parser and progress ------------------------------------------------------------------------


def test_parser_error_is_one_line(capsys):
    ap = quiet.ArgumentParser(prog="tool")
    ap.add_argument("--n", type=quiet.positive_int, default=3, help="a count")
    with pytest.raises(SystemExit) as exc:
        ap.parse_args(["--n", "-1"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == "tool: error: argument --n: expected a positive integer, got '-1'\n"
    with pytest.raises(SystemExit):
        ap.error("two\nlines")
    assert capsys.readouterr().err == "tool: error: two lines\n"
    assert "(default: 3)" in ap.format_help()


def test_progress_is_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    with quiet.Progress("tune rpa", 1000, stream=stream) as p:
        for i in range(1, 1001):
            p(i)
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 2 <= len(lines) <= 11 and lines[-1] == "tune rpa: 1000/1000"
    silent = io.StringIO()
    quiet.Progress("inner", 5, lines=False, stream=silent)(5)
    assert silent.getvalue() == ""


# --- autotune show ------------------------------------------------------------------------------


def test_show_sorts_by_value_and_drops_empty_columns(tmp_path, capsys, monkeypatch):
    from autotune import cli

    keys = [{"dtype": "float32", "num_tokens": n, "max_model_len": 1024} for n in (1024, 16, 2048, 256)]
    table = {"schema_version": 1, "kernel": "rpa", "generation": "v6e",
             "entries": [{"key": k, "block_sizes": {"b": 8},
                          "provenance": {"source": "model", "predicted_us": 1.0, "default_predicted_us": 2.0}}
                         for k in keys]}
    (tmp_path / "v6e").mkdir()
    (tmp_path / "v6e" / "rpa.json").write_text(json.dumps(table))
    df = cli.table_frame("v6e", "rpa", root=tmp_path)
    assert list(df["num_tokens"]) == [16, 256, 1024, 2048]
    import tuned_configs

    monkeypatch.setattr(tuned_configs, "ROOT", tmp_path)
    assert cli.main(["show", "--chip", "v6e", "--kernel", "rpa"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert "static_cycles" not in header and "static_agrees" not in header and "vmem_limit_bytes" not in header
    assert header[:5] == ["kernel", "generation", "dtype", "num_tokens", "max_model_len"]
    assert [int(line.split()[3]) for line in out.splitlines()[1:]] == [16, 256, 1024, 2048]
