"""Every option of every command reaches what it sets; --help groups compile's options by stage and
shows the choices. The option lists come from the commands themselves: a new option without a case
here fails test_every_option_has_a_case."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_helpers import invoke

import sparsec
from models import example_path
from sparsec import cli as cli_module
from sparsec.cli import cli
from sparsec.core.options import NMPattern, declared
from sparsec.recipes import options_from

# compile: option name -> (arguments, the CompileOptions attribute and value they must give)
COMPILE = {
    "nm": (["--nm", "4:8"], NMPattern(4, 8)),
    "sparsity": (["--sparsity", "0.4"], 0.4),
    "method": (["--method", "wanda", "--nm", "2:4", "--calib-random", "2"], "wanda"),
    "group": (["--group", "layer"], "layer"),
    "include": (["--include", "conv"], "conv"),
    "exclude": (["--exclude", "fc"], "fc"),
    "nm_everywhere": (["--nm-everywhere"], True),
    "min_params": (["--min-params", "7"], 7),
    "sequential": (["--sequential", "--calib-random", "2"], True),
    "damp": (["--damp", "0.05"], 0.05),
    "block_size": (["--block-size", "64"], 64),
    "owl": (["--owl", "--sparsity", "0.5", "--nm", None, "--calib-random", "2"], True),
    "owl_lambda": (["--owl-lambda", "0.1"], 0.1),
    "owl_m": (["--owl-m", "3"], 3.0),
    "prune_lm_head": (["--prune-lm-head"], True),
    "permute": (["--permute"], True),
    "min_similarity": (["--min-similarity", "0.99", "--calib-random", "8"], 0.99),
    "channels": (["--channels", "0.3"], 0.3),
    "channels_per_layer_max": (["--channels-per-layer-max", "0.5", "--channels", "0.3"], 0.5),
    "channel_score": (["--channel-score", "bn", "--channels", "0.3"], "bn"),
    "round_to": (["--round-to", "8", "--channels", "0.3"], 8),
    "recover": (["--recover", "--channels", "0.3", "--calib-random", "2"], True),
    "fold_bn": (["--no-fold-bn"], False),
    "heads": (["--heads", "0.25", "--nm", None], 0.25),
    "heads_per_layer": (["--heads-per-layer", "2", "--nm", None], 2),
    "ffn": (["--ffn", "0.25", "--nm", None], 0.25),
    "tokens": (["--tokens", "0.7", "--nm", None], 0.7),
    "tokens_from": (["--tokens-from", "2", "--tokens", "0.7", "--nm", None], 2),
    "bias_correct": (["--bias-correct", "--calib-random", "2"], True),
    "bn_reestimate": (["--bn-reestimate", "--calib-random", "2"], True),
    "correct_samples": (["--correct-samples", "16", "--calib-random", "2"], 16),
    "precision": (["--precision", "fp16"], "fp16"),
    "encode": (["--encode", "csr"], "csr"),
    "rle_bits": (["--rle-bits", "6"], 6),
    "sparse_initializers": (["--sparse-initializers"], True),
    "shapes": (["--shape", "x:1x3x32x32"], {"x": (1, 3, 32, 32)}),
    "calib": (["--calib", "data.npz"], "data.npz"),
    "calib_random": (["--calib-random", "4"], 4),
    "calib_range": (["--calib-range", "x=0,5"], {"x": (0.0, 5.0)}),
    "calib_samples": (["--calib-samples", "3"], 3),
    "batch": (["--batch", "2"], 2),
    "providers": (["--providers", "cuda,cpu"], ("cuda", "cpu")),
    "verify": (["--no-verify"], False),
    "seed": (["--seed", "5"], 5),
    "workers": (["--workers", "2"], 2),
    "ray": (["--ray", "auto"], "auto"),
    "force": (["--force"], True),
    "quiet": (["-q"], True),
}
COMPILE_OWN = {"output", "recipe", "as_json", "verbose"}  # options of the command, not of the compile


def compile_args(name: str) -> list[str]:
    """The case's arguments; `--nm None` drops the default --nm 2:4 the case would otherwise get."""
    args, _ = COMPILE[name]
    base = [] if None in args or name in ("nm", "sparsity") else ["--nm", "2:4"]
    dropped = {i for i, a in enumerate(args) if a is None} | {i - 1 for i, a in enumerate(args) if a is None}
    return base + [a for i, a in enumerate(args) if i not in dropped]


def test_every_option_has_a_case():
    params = {p.name for p in cli.commands["compile"].params if p.param_type_name == "option"} - {"help"}
    assert params - COMPILE_OWN == set(COMPILE) == {f.name for f in declared()}
    for command, names in OTHER.items():
        have = {p.name for p in cli.commands[command].params if p.param_type_name == "option"} - {"help"}
        assert have == set(names), command


@pytest.mark.parametrize("name", sorted(COMPILE))
def test_compile_option_reaches_the_options(monkeypatch, tmp_path, name):
    seen = {}
    monkeypatch.setattr(cli_module.api, "compile", lambda model, **kw: seen.update(kw) or _Stop())
    invoke("compile", tmp_path / "m.onnx", *compile_args(name))
    assert seen, f"compile was not called for {name}"
    kwargs = {k: v for k, v in seen.items() if k not in ("output", "recipe")}
    assert getattr(options_from(kwargs), name) == COMPILE[name][1]


class _Stop:
    """Stands in for a report: the CLI prints it, nothing else happens."""

    nothing_pruned = None

    def to_json(self) -> str:
        return "{}"


def test_compile_own_options(tmp_path):
    out = tmp_path / "o"
    result = invoke("compile", example_path(), "--nm", "2:4", "-o", out, "--json", "-v")
    assert result.exit_code == 0, result.stderr
    assert '"sparsec_version"' in result.stdout and (out / "recipe.yaml").is_file()
    result = invoke("compile", example_path(), "--recipe", out / "recipe.yaml", "-o", tmp_path / "p")
    assert result.exit_code == 0, result.stderr
    assert "INFO" not in invoke("compile", example_path(), "--nm", "2:4", "-o", tmp_path / "q", "-q").stderr


def _compiled(tmp_path: Path) -> Path:
    sparsec.compile(example_path(), output=tmp_path / "o", nm="2:4")
    return tmp_path / "o"


OTHER = {  # command -> option names it has (each exercised below)
    "inspect": ("shapes", "as_json", "verbose", "quiet_log", "sensitivity", "nm", "sparsity", "method",
                "group", "min_params", "include", "exclude", "nm_everywhere", "min_similarity", "calib",
                "calib_random", "calib_range", "calib_samples", "batch", "seed"),  # test_policy_*
    "decode": ("output", "verbose", "quiet_log"),
    "engine": ("output", "shapes", "as_json", "verbose", "quiet_log"),
}


@pytest.mark.parametrize("args", [["--shape", "image=1,3,32,32", "--json"], ["-v"], ["-q"]])
def test_inspect_options(args):
    result = invoke("inspect", example_path(), *args)
    assert result.exit_code == 0, result.stderr
    if "--json" in args:
        assert result.stdout.lstrip().startswith("{")


@pytest.mark.parametrize("flag", ["-v", "-q"])
def test_decode_options(tmp_path, flag):
    out = _compiled(tmp_path)
    result = invoke("decode", out, "-o", tmp_path / "r.onnx", flag)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "r.onnx").read_bytes() == (out / "model.onnx").read_bytes()


@pytest.mark.parametrize("args", [["--shape", "image=1,3,32,32", "--json"], ["-v"], ["-q"]])
def test_engine_options_parse(tmp_path, args):
    """Without TensorRT the command fails with its one line (exit 3); the options parsed (not 2)."""
    result = invoke("engine", example_path(), "-o", tmp_path / "e.engine", *args)
    assert result.exit_code in (0, 1, 3), result.stderr
    assert "No such option" not in result.stderr


def test_help_groups_by_stage_with_choices():
    text = invoke("compile", "--help").stdout
    titles = ["Transformer stage", "Channels stage", "BatchNorm folding stage", "Weights stage",
              "Precision stage", "Encode stage", "Calibration, shapes and verification", "Output and run"]
    positions = [text.index(t) for t in titles]
    assert positions == sorted(positions)
    assert "[magnitude|wanda|sparsegpt]" in text and "[fp32|fp16|bf16]" in text
    weights = text[text.index("Weights stage"):text.index("Precision stage")]
    assert "--nm" in weights and "--owl-m" in weights and "--channels" not in weights
    assert "[default: 256]" in weights


def test_verbose_and_quiet_on_every_command():
    for command in ("compile", "inspect", "decode", "engine"):
        text = invoke(command, "--help").stdout
        assert "-v, --verbose" in text and "-q, --quiet" in text, command


@pytest.mark.parametrize(("flag", "value", "shown"), [
    ("--method", "obs", "magnitude, wanda, sparsegpt"), ("--precision", "int4", "fp32, fp16, bf16"),
    ("--group", "row", "output, layer, input"), ("--channel-score", "l3", "l1, l2, bn, act"),
    ("--encode", "zip", "nm_rank"),
])
def test_a_bad_choice_is_one_line_naming_the_flag(tmp_path, flag, value, shown):
    from cli_helpers import assert_one_line_error

    extra = ["--channels", "0.3"] if flag == "--channel-score" else ["--nm", "2:4"]
    assert_one_line_error(invoke("compile", example_path(), *extra, flag, value, "-o", tmp_path / "o"),
                          f"{flag} {value!r}", shown)
