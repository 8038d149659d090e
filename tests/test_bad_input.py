"""Bad input and safe defaults (issue 9). Every bad file, row, model or config either stops its
command with one line that names it (exit 2; the output directory as it was, nothing half-written
beside it) or is dropped and counted by reason in the manifest. Checkpoints load without running
their code or unpickling, and the embedded Ray listens on loopback only.

Trusted values: hand-made inputs whose outcome is known by construction, file bytes and mtimes
taken before and after, a plain `transformers` forward for the reference cache, the sockets the
kernel reports, and the source code's own syntax tree."""

import ast
import hashlib
import ipaddress
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import main
from pipeline.manifest import read_manifest, write_stage

REPO = Path(__file__).resolve().parents[1]
HUGE = "1+" * 40 + "1="  # 82 tokens with BOS: longer than the toy's 64-token context



def _parquet(path: Path, columns: dict) -> None:
    pq.write_table(pa.table(columns), path)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, toy_model_dir) -> Path:
    """Every bad input, written once: files, models and configs."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.parquet").write_bytes(b"")
    (d / "empty.jsonl").write_bytes(b"")
    _parquet(d / "prompts.parquet", {"prompt": ["1+1=", "2+2="], "answer": ["2", "4"]})
    _parquet(d / "no_prompt.parquet", {"question": ["1+1="]})
    _parquet(d / "int_prompt.parquet", {"prompt": [1, 2]})
    _parquet(d / "empty_and_long.parquet", {"prompt": ["  ", HUGE], "answer": ["0", "41"]})
    # Row 1 holds Latin-1 bytes (0xe9 alone is no UTF-8).
    for name, row in (("prompts", '"answer": "2"'), ("pairs", '"chosen": "a", "rejected": "b"'),
                      ("sft", '"response": "2"')):
        (d / f"non_utf8_{name}.jsonl").write_bytes(
            b'{"prompt": "1+1=", ' + row.encode() + b'}\n'
            b'{"prompt": "caf\xe9", ' + row.encode() + b'}\n')
    # Preference data (import / precompute).
    _parquet(d / "int_pairs.parquet", {"prompt": [1], "chosen": ["a"], "rejected": ["b"]})
    _parquet(d / "no_chosen.parquet", {"prompt": ["x"], "rejected": ["b"]})
    _parquet(d / "no_prompt_pairs.parquet", {"chosen": ["2"], "rejected": ["3"]})
    _parquet(d / "same_pairs.parquet", {"prompt": ["1+1=", "2+2="], "chosen": ["2", "4"],
                                        "rejected": ["2", "5"]})
    _parquet(d / "huge_pairs.parquet", {"prompt": [HUGE], "chosen": ["41"], "rejected": ["40"]})
    _parquet(d / "pairs.parquet", {"prompt": ["1+1=", "12+30="], "chosen": ["2", "42"],
                                   "rejected": ["3", "43"]})
    # Samples and scores (score / pair).
    samples = {"prompt_id": ["p0"] * 3, "prompt": ["1+1="] * 3, "response": ["2", "bad", "3"],
               "sample_index": [0, 1, 2], "answer": ["2"] * 3}
    _parquet(d / "samples.parquet", samples)
    _parquet(d / "no_response.parquet", {k: v for k, v in samples.items() if k != "response"})
    _parquet(d / "nan_scored.parquet", {**samples, "score": [1.0, float("nan"), 0.0]})
    # The same response twice, scored differently (a noisy scorer): never a pair with itself.
    _parquet(d / "same_response.parquet", {"prompt_id": ["p0"] * 2, "prompt": ["1+1="] * 2,
                                           "response": ["2", "2"], "sample_index": [0, 1],
                                           "score": [1.0, 0.0]})
    (d / "scorers.py").write_text(
        "def nan_scorer(prompts, responses, rows):\n"
        "    return [float('nan') if r == 'bad' else 1.0 for r in responses]\n\n\n"
        "def inf_scorer(prompts, responses, rows):\n"
        "    return [float('-inf') if r == 'bad' else 1.0 for r in responses]\n")
    _parquet(d / "sft_huge.parquet", {"prompt": ["1+1=", HUGE], "response": ["2", "41"]})
    # Configs.
    (d / "unknown_key.yaml").write_text("min_marginn: 0.1\n")
    (d / "wrong_type.yaml").write_text("k: eight\n")
    (d / "nested_wrong_type.yaml").write_text("engine:\n  replicas: two\n")
    (d / "nested_unknown.yaml").write_text("engine:\n  gpu_mem: 0.5\n")
    (d / "invalid.yaml").write_text("k: [1, 2\n")
    (d / "iterate_typo.yaml").write_text(
        f"policy: {toy_model_dir}\nprompts: {d / 'prompts.parquet'}\n"
        f"eval_prompts: {d / 'prompts.parquet'}\nscorer: addition\ntrain:\n  betta: 0.1\n")
    (d / "iterate_float16.yaml").write_text(
        f"policy: {toy_model_dir}\nprompts: {d / 'prompts.parquet'}\n"
        f"eval_prompts: {d / 'prompts.parquet'}\nscorer: addition\ntrain:\n  beta: 0.1\n"
        "  dtype: float16\n")
    (d / "byod_typo.yaml").write_text(
        f"model: {toy_model_dir}\ndata: {d / 'pairs.parquet'}\nsft:\n  max_stepz: 1\n"
        f"train:\n  beta: 0.1\n")
    _evil_model(toy_model_dir, d)
    _pickled_model(toy_model_dir, d / "pickled")
    return d


def _evil_model(toy: str, d: Path) -> None:
    """Copies of the toy whose config.json maps Auto* classes to a module in the checkpoint
    (`auto_map`) that, if ever imported, writes d/EVIL_RAN. `evil`: an unknown model_type, so
    only that code could load it; `evil_llama`: model_type llama, which transformers loads with
    its own class when remote code is off."""
    for name, model_type in (("evil", "odpo_evil"), ("evil_llama", "llama")):
        out = d / name
        shutil.copytree(toy, out)
        config = json.loads((out / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig",
                              "AutoModelForCausalLM": "evil.EvilModel"}
        config["model_type"] = model_type
        (out / "config.json").write_text(json.dumps(config))
        (out / "evil.py").write_text(
            f"import pathlib\npathlib.Path({str(d / 'EVIL_RAN')!r}).write_text('ran')\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
            "class EvilConfig(LlamaConfig):\n    model_type = 'odpo_evil'\n\n\n"
            "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")


def _pickled_model(toy: str, out: Path) -> None:
    """The toy with its weights as `pytorch_model.bin` (torch.save, i.e. pickle) only."""
    from safetensors.torch import load_file

    shutil.copytree(toy, out)
    torch.save(load_file(str(out / "model.safetensors")), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()


def _previous_output(out: Path, command: str) -> None:
    """What a user already has at `out`: a complete output of the command's stage, written by
    the stage writer itself, or (a run directory) a file of results."""
    stages = {"sample": "sample", "score": "score", "pair": "pair", "precompute": "precompute",
              "import": "import"}
    if command in ("sft", "train"):  # a finished run with another config
        from pipeline.manifest import finish_run

        (out / "model").mkdir(parents=True)
        (out / "model" / "model.safetensors").write_bytes(b"earlier weights")
        finish_run(str(out), command, {"earlier": True}, {}, "model", {"summary": {}})
        return
    if command not in stages:
        out.mkdir(parents=True)
        (out / "results.txt").write_text("an earlier run's results\n")
        return

    def write(tmp: Path) -> None:
        _parquet(tmp / "part-00000.parquet", {"prompt": ["kept"]})

    write_stage(out, stages[command], {"earlier": True}, {}, write, rows_in=1, dropped={})


def _snapshot(out: Path) -> dict:
    """Every file under `out` (bytes digest and mtime) and every entry beside it."""
    files = {str(f.relative_to(out)): (hashlib.sha256(f.read_bytes()).hexdigest(),
                                       f.stat().st_mtime_ns)
             for f in sorted(out.rglob("*")) if f.is_file()}
    return {"files": files, "beside": sorted(p.name for p in out.parent.iterdir())}


def _one_error_line(capsys, command: str) -> str:
    """The command's error: exactly one `odpo CMD: error:` line and no traceback anywhere."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("odpo ")]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"odpo {command}: error: ")
    return lines[0]


# ---------------------------------------------------------------- errors: one line, outputs kept

ERRORS = [
    # Empty files: 0 bytes, as prompts, samples, scores, pairs, import and SFT data.
    ("sample", "--model {toy} --prompts {bad}/empty.parquet", r"empty\.parquet: empty file \(0"),
    ("sample", "--model {toy} --prompts {bad}/empty.jsonl", r"empty\.jsonl: empty file \(0 bytes"),
    ("score", "--samples {bad}/empty.jsonl --scorer exact", r"empty\.jsonl: empty file"),
    ("pair", "--scored {bad}/empty.parquet", r"empty\.parquet: empty file"),
    ("precompute", "--pairs {bad}/empty.jsonl --model {toy}", r"empty\.jsonl: empty file"),
    ("import", "--data {bad}/empty.parquet", r"empty\.parquet: empty file"),
    ("import", "--data {bad}/empty.jsonl", r"empty\.jsonl: empty file"),
    ("sft", "--model {toy} --data {bad}/empty.jsonl", r"empty\.jsonl: empty file"),
    # Wrong schema: a missing column, a column of the wrong type.
    ("sample", "--model {toy} --prompts {bad}/no_prompt.parquet",
     r"no_prompt\.parquet: missing column\(s\) \['prompt'\]; found \['question'\]"),
    ("sample", "--model {toy} --prompts {bad}/int_prompt.parquet",
     r"int_prompt\.parquet: column `prompt` must hold strings, found int64"),
    ("import", "--data {bad}/int_pairs.parquet", r"int_pairs\.parquet: column `prompt` is int64"),
    ("import", "--data {bad}/no_chosen.parquet", r"missing column\(s\) \['chosen'\]"),
    ("precompute", "--pairs {bad}/no_prompt_pairs.parquet --model {toy}",
     r"no_prompt_pairs\.parquet: missing column\(s\) \['prompt'\]"),
    ("score", "--samples {bad}/no_response.parquet --scorer exact",
     r"no_response\.parquet: missing column\(s\) \['response'\]"),
    # Text that is not UTF-8: named by file, column, row and its first bytes.
    ("import", "--data {bad}/non_utf8_pairs.jsonl",
     r"non_utf8_pairs\.jsonl: column `prompt` holds text that is not valid UTF-8 "
     r"\(row 1: b'caf\\xe9'\)"),
    ("precompute", "--pairs {bad}/non_utf8_pairs.jsonl --model {toy}",
     r"column `prompt` holds text that is not valid UTF-8 \(row 1: b'caf\\xe9'\)"),
    ("sample", "--model {toy} --prompts {bad}/non_utf8_prompts.jsonl",
     r"non_utf8_prompts\.jsonl: column `prompt` holds text that is not valid UTF-8 "
     r"\(row 1: b'caf\\xe9'\)"),
    ("sft", "--model {toy} --data {bad}/non_utf8_sft.jsonl",
     r"non_utf8_sft\.jsonl: column `prompt` holds text that is not valid UTF-8"),
    # A prompt longer than the context: SFT names the row (sample and precompute drop, below).
    ("sft", "--model {toy} --data {bad}/sft_huge.parquet",
     r"sft_huge\.parquet: row with prompt '1\+1\+.*' is \d+ tokens, longer than max_length 64"),
    # NaN / inf scores: the scorer's row is named; pair refuses a non-finite score.
    ("score", "--samples {bad}/samples.parquet --scorer {bad}/scorers.py:nan_scorer",
     r"nan_scorer' returned nan for prompt_id=p0 sample_index=1; .* --nonfinite drop"),
    ("score", "--samples {bad}/samples.parquet --scorer {bad}/scorers.py:inf_scorer",
     r"inf_scorer' returned -inf for prompt_id=p0 sample_index=1"),
    ("pair", "--scored {bad}/nan_scored.parquet",
     r"score nan for prompt_id=p0 sample_index=1: pair needs finite scores"),
    # Configs: an unknown key or a wrong type, at the top, nested, or in an iterate section.
    ("pair", "--config {bad}/unknown_key.yaml --scored {bad}/same_response.parquet",
     r"unknown_key\.yaml: unknown key\(s\) \['min_marginn'\] for PairConfig; valid: "),
    ("sample", "--config {bad}/wrong_type.yaml --model {toy} --prompts {bad}/prompts.parquet",
     r"wrong_type\.yaml: k must be int, got str 'eight'"),
    ("sample", "--config {bad}/nested_wrong_type.yaml --model {toy} "
     "--prompts {bad}/prompts.parquet", r"engine\.replicas must be int, got str 'two'"),
    ("sample", "--config {bad}/nested_unknown.yaml --model {toy} --prompts {bad}/prompts.parquet",
     r"unknown key\(s\) \['engine\.gpu_mem'\] for EngineConfig"),
    ("sample", "--config {bad}/invalid.yaml --model {toy} --prompts {bad}/prompts.parquet",
     r"invalid\.yaml: invalid YAML: "),
    ("iterate", "--config {bad}/iterate_typo.yaml",
     r"iterate config section 'train': unknown key\(s\) \['betta'\] for DPOConfig"),
    ("byod", "--config {bad}/byod_typo.yaml",
     r"byod config section 'sft': unknown key\(s\) \['max_stepz'\] for SFTConfig"),
    # Safe defaults: a checkpoint that needs its own code, or has only pickled weights.
    ("sample", "--model {bad}/evil --prompts {bad}/prompts.parquet",
     r"model .*/evil: its config\.json needs the checkpoint's own Python code"),
    ("precompute", "--pairs {bad}/pairs.parquet --model {bad}/evil", r"evil: its config\.json "),
    ("sft", "--model {bad}/evil --data {bad}/sft_huge.parquet", r"evil: its config\.json "),
    ("train", "--model {bad}/evil --data {bad}/nowhere --beta 0.1", r"evil: its config\.json "),
    ("eval", "--model {bad}/evil --prompts {bad}/prompts.parquet --scorer addition",
     r"evil: its config\.json "),
    ("sample", "--model {bad}/pickled --prompts {bad}/prompts.parquet",
     r"model .*/pickled: only pickled weights \['pytorch_model\.bin'\]; weights are loaded from "
     r"safetensors only"),
    ("precompute", "--pairs {bad}/pairs.parquet --model {bad}/pickled", r"only pickled weights"),
    ("sft", "--model {bad}/pickled --data {bad}/sft_huge.parquet", r"only pickled weights"),
    ("train", "--model {bad}/pickled --data {bad}/nowhere --beta 0.1", r"only pickled weights"),
    ("score", "--samples {bad}/samples.parquet --scorer reward_model "
     "--reward-model {bad}/pickled", r"reward model .*/pickled: only pickled weights"),
    # Every training field checked on the driver, not in a Ray Train worker (issue 15).
    # A flag's value outside its choices is refused by the parser, naming them (the stage's own
    # check, for a config file, is the iterate case below).
    ("train", "--model {toy} --data {bad}/nowhere --beta 0.1 --dtype float16",
     r"argument --dtype: invalid choice: 'float16' \(choose from 'float32', 'bfloat16'\)"),
    ("sft", "--model {toy} --data {bad}/sft_huge.parquet --lr-schedule cosine_restarts",
     r"argument --lr-schedule: invalid choice: 'cosine_restarts' \(choose from 'constant', "
     r"'linear', 'cosine'\)"),
    ("train", "--model {toy} --data {bad}/nowhere --beta 0.1 --loss-type ipo "
     "--label-smoothing 0.1", r"label_smoothing applies to \('sigmoid', 'robust', .*\) only; "
     r"loss_type 'ipo' would ignore it"),
    ("iterate", "--config {bad}/iterate_float16.yaml",
     r"dtype must be one of \('float32', 'bfloat16'\)"),
    ("train", "--model {toy} --data {bad}/nowhere --beta 0.1 --lora-r -1",
     r"lora\.r must be >= 0 \(0: full fine-tuning\), got -1"),
    # A model path that does not exist is no hub id: named before any work.
    ("train", "--model {bad}/no/such/model --data {bad}/nowhere --beta 0.1",
     r"model .*/no/such/model: no such directory \(a local checkpoint path; a hub id is "
     r"written org/name\)"),
    ("sft", "--model {bad}/missing --data {bad}/sft_huge.parquet",
     r"model .*/missing: no such directory"),
    ("eval", "--model {bad}/missing --prompts {bad}/prompts.parquet --scorer addition",
     r"model .*/missing: no such directory"),
    ("precompute", "--pairs {bad}/pairs.parquet --model {bad}/missing",
     r"model .*/missing: no such directory"),
    # What counts as correct has no default (issue 16): the toy's `addition` is asked for.
    ("eval", "--model {toy} --prompts {bad}/prompts.parquet",
     r"scorer is required \(set --scorer\)"),
    ("sft", "--model {toy} --data {bad}/sft_huge.parquet --eval-prompts {bad}/prompts.parquet",
     r"eval_prompts needs --scorer"),
]
# Where each command's output goes.
OUT_FLAG = {"iterate": "--run-dir", "byod": "--run-dir"}


def _argv(command: str, args: str, bad: Path, toy: str, out: Path) -> list[str]:
    argv = [command] + [a.format(bad=bad, toy=toy) for a in args.split()]
    if command == "eval":
        return argv + ["--out", str(out / "eval.json")]
    argv += [OUT_FLAG.get(command, "--out"), str(out)]
    if command == "precompute":
        argv += ["--cache-dir", ""]  # no shared store: each case computes or fails on its own
    return argv


def _case_id(command: str, args: str) -> str:
    """`sample:empty.parquet`: the command and the first bad input it is given."""
    models = re.findall(r"model {bad}/(\w+)", args)
    names = models or re.findall(r"{bad}/([\w.]+)", args) or ["toy"]
    return f"{command}:{names[0]}"


@pytest.mark.parametrize("command, args, message", ERRORS,
                         ids=[_case_id(c, a) for c, a, _ in ERRORS])
def test_bad_input_is_one_line_and_leaves_outputs(command, args, message, bad, toy_model_dir,
                                                  ray_local, tmp_path, capsys):
    out = tmp_path / "out"
    _previous_output(out, command)
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_argv(command, args, bad, toy_model_dir, out)) == 2
    line = _one_error_line(capsys, command)
    assert re.search(message, line), line
    assert _snapshot(out) == before  # same bytes, same mtimes, no .out.tmp-* beside it
    assert not (bad / "EVIL_RAN").exists()


# ---------------------------------------------------------------- counted drops

DROPS = [
    # (command, args, dropped by reason, rows out)
    ("import", "--data {bad}/same_pairs.parquet", {"identical": 1}, 1),
    # No `prompt` column is TRL's implicit prompt: the common prefix, here none.
    ("import", "--data {bad}/no_prompt_pairs.parquet", {"no_common_prefix": 1}, 0),
    # import knows no model: length is the precompute stage's business (truncate or drop).
    ("import", "--data {bad}/huge_pairs.parquet", {}, 1),
    ("precompute", "--pairs {bad}/huge_pairs.parquet --model {toy} --truncation drop",
     {"too_long": 1}, 0),
    ("precompute", "--pairs {bad}/same_pairs.parquet --model {toy}", {"identical_ids": 1}, 1),
    ("sample", "--model {toy} --prompts {bad}/empty_and_long.parquet",
     {"empty_prompt": 1, "prompt_too_long": 1}, 0),
    ("score", "--samples {bad}/samples.parquet --scorer {bad}/scorers.py:nan_scorer "
     "--nonfinite drop", {"nonfinite_score": 1}, 2),
    ("score", "--samples {bad}/samples.parquet --scorer {bad}/scorers.py:inf_scorer "
     "--nonfinite drop", {"nonfinite_score": 1}, 2),
    ("pair", "--scored {bad}/same_response.parquet", {"tie": 1}, 0),
    ("pair", "--scored {bad}/same_response.parquet --mode correct_incorrect",
     {"no_incorrect": 1}, 0),
]


@pytest.mark.parametrize("command, args, dropped, rows_out", DROPS,
                         ids=[f"{c}:{next(iter(d), 'kept')}" for c, _, d, _ in DROPS])
def test_bad_rows_are_dropped_and_counted(command, args, dropped, rows_out, bad, toy_model_dir,
                                          ray_local, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(command, args, bad, toy_model_dir, out)) == 0
    m = read_manifest(out)
    assert m["dropped"] == dropped
    assert m["rows_out"] == rows_out
    assert m["rows_in"] == m.get("rows_kept", m["rows_out"]) + sum(dropped.values())
    said = capsys.readouterr().out
    for reason, n in dropped.items():
        assert f"{reason} {n}" in said  # the summary line says what was dropped
    tables = [pq.read_table(out / f["name"]) for f in m["files"]]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    assert all(r["chosen"] != r["rejected"] for r in rows if "chosen" in r)


# `odpo sft` dropping and counting over-long rows: the real byod run of tests/test_import.py
# (its SFT on chosen). A repeated, an empty and a too-long prompt dropped and counted by `odpo
# sample` (the one case that needs vLLM): the shared sample run (tests/test_sample.py).


# ---------------------------------------------------------------- a reference from another model


def _plain_logps(model_dir, prompt: str, completion: str) -> float:
    """Summed completion log-prob by a plain forward; the toy tokenizer is one id per character,
    BOS before the prompt and EOS after the completion."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    p = [tok.bos_token_id] + tok.convert_tokens_to_ids(list(prompt))
    c = tok.convert_tokens_to_ids(list(completion)) + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[len(p) + j - 1, t]) for j, t in enumerate(c))


def _ref_values(out: Path) -> list[float]:
    """Chosen, rejected, chosen, ... reference log-probs of a precompute stage, in pair order."""
    t = pa.concat_tables([pq.read_table(out / f["name"]) for f in read_manifest(out)["files"]])
    return [x for pair in zip(t["ref_chosen_logps"].to_pylist(),
                              t["ref_rejected_logps"].to_pylist(), strict=True) for x in pair]


def test_reference_from_another_model_is_never_reused(bad, toy_model_dir, ray_local, tmp_path,
                                                      capsys):
    from pipeline.toy import ToyConfig, init_toy_model

    other = tmp_path / "other"
    init_toy_model(ToyConfig(out=str(other), seed=1))
    store = tmp_path / "store"

    def precompute(model, out, *extra):
        return main(["precompute", "--pairs", str(bad / "pairs.parquet"), "--model", str(model),
                     "--out", str(out), "--cache-dir", str(store), *extra])

    first = tmp_path / "first"
    assert precompute(toy_model_dir, first) == 0
    toy_values = _ref_values(first)
    # `out` holds a complete precompute output of another model (the toy).
    out = tmp_path / "out"
    shutil.copytree(first, out)
    before = _snapshot(out)
    capsys.readouterr()
    assert precompute(other, out, "--cache", "require") == 2
    assert "reference cache miss" in _one_error_line(capsys, "precompute")
    assert _snapshot(out) == before
    # Without `require` it is recomputed with the model asked for.
    assert precompute(other, out) == 0
    assert "cache computed" in capsys.readouterr().out
    expected = [_plain_logps(other, p, c) for p, c in
                (("1+1=", "2"), ("1+1=", "3"), ("12+30=", "42"), ("12+30=", "43"))]
    assert _ref_values(out) == pytest.approx(expected, abs=1e-4)
    assert _ref_values(out) != pytest.approx(toy_values, abs=1e-3)
    # A store entry under this key holding the toy's output (a stale or tampered store) is not
    # taken either: the entry's own manifest must carry the key.
    key = read_manifest(out)["cache_key"]
    shutil.rmtree(store / key)
    shutil.copytree(first, store / key)
    assert precompute(other, tmp_path / "again") == 0
    assert "cache computed" in capsys.readouterr().out
    assert _ref_values(tmp_path / "again") == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- safe defaults


def test_remote_code_is_never_run(bad, toy_model_dir, ray_local, tmp_path, capsys):
    """`auto_map` with a model_type transformers knows: loaded with its own class; the
    checkpoint's module is never imported (the refused unknown model_type is in ERRORS)."""
    out = tmp_path / "samples"  # every prompt dropped: config + tokenizer loads, no engine
    assert main(["sample", "--model", str(bad / "evil_llama"), "--prompts",
                 str(bad / "empty_and_long.parquet"), "--out", str(out)]) == 0
    assert read_manifest(out)["dropped"] == {"empty_prompt": 1, "prompt_too_long": 1}
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(bad / "evil_llama", trust_remote_code=False,
                                         use_safetensors=True)
    assert not (bad / "EVIL_RAN").exists()


def test_pickled_weights_are_refused_by_the_loaders_too(bad):
    """The workers' own loads (behind the drivers' check) refuse a pickle-only checkpoint."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError, match="safetensors"):
        AutoModelForCausalLM.from_pretrained(bad / "pickled", use_safetensors=True)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name, {k.arg: k.value for k in node.keywords}


def _is(value, constant) -> bool:
    return isinstance(value, ast.Constant) and value.value is constant


def test_every_load_is_safe_and_nothing_pickles():
    """In the product code: each `from_pretrained` passes trust_remote_code=False (model loads
    also use_safetensors=True), vLLM's LLM(...) trust_remote_code=False, `torch.load` only with
    weights_only=True, and no module imports pickle (stage data is Arrow / Parquet / JSON)."""
    loads = 0
    for path in sorted(p for d in ("pipeline", "trainer", "jobs") for p in (REPO / d).rglob("*.py")
                       if ".venv" not in p.parts):
        tree = ast.parse(path.read_text())
        for node, owner, name, kw in _calls(tree):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name == "from_pretrained":
                loads += 1
                assert _is(kw.get("trust_remote_code"), False), where
                if owner.startswith("AutoModel"):
                    assert _is(kw.get("use_safetensors"), True), where
            if name == "LLM":
                assert _is(kw.get("trust_remote_code"), False), where
            if name == "load" and owner == "torch":
                assert _is(kw.get("weights_only"), True), where
        imports = {a.name.split(".")[0] for n in ast.walk(tree)
                   if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        imports |= {n.module.split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.module}
        assert not imports & {"pickle", "cloudpickle", "dill", "joblib"}, path
    assert loads >= 10  # the scan saw the loads it guards


def test_embedded_ray_listens_on_loopback_only(ray_local):
    import os

    import psutil
    from two_nodes import TWO_NODES

    ray_local.get(ray_local.remote(lambda: os.getpid()).remote())  # a worker is up
    me = psutil.Process()
    tree = {me.pid} | {p.pid for p in me.children(recursive=True)}
    # Not this Ray's: the two-node run (tests/two_nodes.py, its own cluster) in the background,
    # whose 2-worker training's torch TCPStore listens on '::' (torch's, not Ray's; seen once)
    for p in me.children():
        try:
            if TWO_NODES in p.cmdline():
                tree -= {p.pid} | {c.pid for c in p.children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    listening = [c.laddr for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in tree]
    assert len(listening) >= 3  # GCS, raylet, workers: Ray's servers were found
    for ip, port in listening:
        addr = ipaddress.ip_address(ip)
        addr = getattr(addr, "ipv4_mapped", None) or addr
        assert addr.is_loopback, (ip, port)
    assert not ray_local._private.worker._global_node.address_info.get("webui_url")


def test_missing_model_path_fails_before_ray_starts(tmp_path):
    """`runs/sft/modle` (a typo under an existing directory) is no hub id: `odpo train` says so
    in one line at once, instead of a traceback from inside Ray Train a minute later."""
    import subprocess
    import sys

    (tmp_path / "runs" / "sft").mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "train", "--model", "runs/sft/modle", "--data",
         "runs/r1/precompute", "--out", "runs/r1/train", "--beta", "0.1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "odpo train: error: model runs/sft/modle: no such directory (a local checkpoint path; "
        "a hub id is written org/name)"]
    assert not (tmp_path / "runs" / "r1").exists()
