"""Bad input, as a user or an attacker gives it: one line on stderr, a non-zero exit, nothing changed.

Every row of CASES runs one command through the CLI against one repository shared by the module
(a tiny Llama with a tokenizer, one edit and a tag) and asserts: the exit status, exactly one
stderr line starting `kedit: error:` (no traceback, no "internal error"), the words that name
the problem, and a repository snapshot (HEAD, refs, reflog, every commit row, objects, probes,
editors, metrics) equal before and after. Files a row needs are written by `_files` and named
in its arguments as `{file:NAME}`; `{out}` is a fresh path for commands that write one.

The other tests here are the non-finite attacks: hyper-parameters that would train a NaN
codebook or lift a norm limit, and hand-built non-finite adapters, memories, deltas and
editors given to the library's commit paths.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from kedit.core.delta import Adapter, Dense, LowRank
from kedit.core.errors import DeltaError
from kedit.core.repo import Repository
from kedit.edit.trained import store_editor
from tests.tiny import make_model, make_tokenizer

from .helpers_engine import kedit, refused, snapshot

NORM = "model.norm.weight"
PROMPT = ["--prompt", "The capital city is France", "--subject", "France"]
EDIT = ["edit", *PROMPT, "--target", "Japan", "--no-eval"]
BIG = "x" * 1_200_000  # a 1.2 MB string


def _requests(*records: object) -> bytes:
    return json.dumps(list(records)).encode()


def _request(**fields: object) -> bytes:
    return _requests({"prompt": "The capital city is France", "subject": "France", "target_new": "Japan", **fields})


def _zsre(**fields: object) -> bytes:
    return _requests({"src": "What is the capital of France?", "subject": "France", "alt": "Rome",
                      "answers": ["Paris"], **fields})


def _safetensors_header(length: int, header: bytes = b"") -> bytes:
    return struct.pack("<Q", length) + header


FILES: dict[str, bytes] = {
    "good.json": _request(),
    "ff.json": b"\xff" + _request(),
    "empty.json": b"",
    "blank.json": b"  \n\t\n",
    "words.json": b"hello, world",
    "number.json": b"5",
    "string.json": b'"a fact"',
    "null.json": b"null",
    "numbers.json": b"[1, 2]",
    "nothing.json": b"[]",
    "unknown.json": _requests({"question": "x", "answer": "y"}),
    "two-braces.json": _request(prompt="{} and {} meet in France"),
    "named-brace.json": _request(prompt="{x} is the capital city of France"),
    "lone-brace.json": _request(prompt="The capital city} is France"),
    "zsre-loc.json": _zsre(loc=5, loc_ans="x"),
    "zsre-rephrase.json": _zsre(rephrase=7),
    "zsre-alt.json": _zsre(alt=None),
    "zsre-src.json": _zsre(src=12),
    "para-null.json": _request(paraphrases=[None, 3]),
    "para-int.json": _request(paraphrases=5),
    "neighbours.json": _request(neighbourhood=[1]),
    "neighbours-number.json": _request(neighbourhood=3),
    "rephrase-number.json": _requests({"prompt": "The capital city is France", "subject": "France",
                                       "target_new": "Japan", "rephrase_prompt": 5}),
    "cf-paraphrases-number.json": _requests({"requested_rewrite": {
        "prompt": "The capital city is {}", "subject": "France", "target_new": {"str": "Japan"}},
        "paraphrase_prompts": 7}),
    "prompt-int.json": _request(prompt=42),
    "subject-null.json": _request(subject=None),
    "subject-missing.json": _requests({"prompt": "The capital city is France", "target_new": "Japan"}),
    "subject-elsewhere.json": _request(subject="Germany"),
    "target-empty.json": _request(target_new="  "),
    "target-null.json": _request(target_new=None),
    "target-big.json": _request(target_new=BIG),
    "prompt-big.json": _request(prompt="France " + BIG),
    "locality-int.json": _request(locality_prompt=5, locality_ground_truth="x"),
    "locality-number.json": _request(locality=5),
    "portability-prompt-int.json": _request(portability={"prompt": 5, "ground_truth": "x"}),
    "locality-answers-short.json": _request(locality={"prompt": ["a", "b"], "ground_truth": ["x"]}),
    "locality-answers-string.json": _request(locality={"prompt": ["a", "b"], "ground_truth": "xy"}),
    "cf-string.json": _requests({"requested_rewrite": "France -> Japan"}),
    "cf-no-prompt.json": _requests({"requested_rewrite": {"subject": "France", "target_new": {"str": "Japan"}}}),
    "bad-line.jsonl": _request()[1:-1] + b"\n{not json\n",
    "list-line.jsonl": _request()[1:-1] + b"\n[1]\n",
    "deep.json": b"[" * 100_000 + b"]" * 100_000,
    "python-tag.yaml": b"v_lr: !!python/object/apply:os.system ['touch /tmp/kedit-pwned']\n",
    "malformed.yaml": b"v_lr: [1, 2\nkl_factor: : :\n",
    "list.yaml": b"- 1\n- 2\n",
    "ff.yaml": b"\xffv_lr: 1\n",
    "unknown.yaml": b"no_such_knob: 3\n",
    "inf.yaml": b"v_lr: .inf\n",
    "nan.yaml": b"kl_factor: .nan\n",
    "noise.safetensors": b"\x13\x37" * 300,
    "empty.safetensors": b"",
    "huge-header.safetensors": _safetensors_header(2**62, b"{}"),
    "short-header.safetensors": _safetensors_header(4000, b'{"a": '),
    "not-json-header.safetensors": _safetensors_header(8, b"not json"),
    "bad-offsets.safetensors": _safetensors_header(
        80, b'{"w":{"dtype":"F32","shape":[1000,1000],"data_offsets":[0,4000000]}}'.ljust(80)) + b"\0" * 16,
}

# (id, arguments, exit status, words the error line must hold). Click's own checks exit 2.
CASES: list[tuple[str, list[str], int, str]] = [
    # -- request files (kedit edit --requests) --
    ("requests-not-utf8", ["edit", "--requests", "{file:ff.json}", "--no-eval"], 1, "is not UTF-8 text"),
    ("requests-empty", ["edit", "--requests", "{file:empty.json}", "--no-eval"], 1, "not valid JSON"),
    ("requests-blank", ["edit", "--requests", "{file:blank.json}", "--no-eval"], 1, "not valid JSON"),
    ("requests-words", ["edit", "--requests", "{file:words.json}", "--no-eval"], 1, "not valid JSON"),
    ("requests-number", ["edit", "--requests", "{file:number.json}", "--no-eval"], 1, "not a JSON object"),
    ("requests-string", ["edit", "--requests", "{file:string.json}", "--no-eval"], 1, "not a JSON object"),
    ("requests-null", ["edit", "--requests", "{file:null.json}", "--no-eval"], 1, "not a JSON object"),
    ("requests-numbers", ["edit", "--requests", "{file:numbers.json}", "--no-eval"], 1, "record 0 is not"),
    ("requests-none", ["edit", "--requests", "{file:nothing.json}", "--no-eval"], 1, "no edit requests"),
    ("requests-unknown-format", ["edit", "--requests", "{file:unknown.json}", "--no-eval"], 1, "unrecognised"),
    ("prompt-two-braces", ["edit", "--requests", "{file:two-braces.json}", "--no-eval"], 1, "'{}' once"),
    ("prompt-named-brace", ["edit", "--requests", "{file:named-brace.json}", "--no-eval"], 1, "no other braces"),
    ("prompt-lone-brace", ["edit", "--requests", "{file:lone-brace.json}", "--no-eval"], 1, "no other braces"),
    ("zsre-loc-number", ["edit", "--requests", "{file:zsre-loc.json}", "--no-eval"], 1, "must be text"),
    ("zsre-rephrase-number", ["edit", "--requests", "{file:zsre-rephrase.json}", "--no-eval"], 1, "must be text"),
    ("zsre-alt-null", ["edit", "--requests", "{file:zsre-alt.json}", "--no-eval"], 1, "target is empty"),
    ("zsre-src-number", ["edit", "--requests", "{file:zsre-src.json}", "--no-eval"], 1, "record 0"),
    ("paraphrases-null-and-number", ["edit", "--requests", "{file:para-null.json}", "--no-eval"], 1,
     "paraphrases[0] must be text"),
    ("paraphrases-number", ["edit", "--requests", "{file:para-int.json}", "--no-eval"], 1,
     "paraphrases must be a list of texts"),
    ("neighbourhood-number", ["edit", "--requests", "{file:neighbours.json}", "--no-eval"], 1, "must be text"),
    ("neighbourhood-not-a-list", ["edit", "--requests", "{file:neighbours-number.json}", "--no-eval"], 1,
     "neighbourhood must be a list of texts"),
    ("knowedit-rephrase-number", ["edit", "--requests", "{file:rephrase-number.json}", "--no-eval"], 1,
     "paraphrases must be a list of texts"),
    ("counterfact-paraphrases-number", ["edit", "--requests", "{file:cf-paraphrases-number.json}", "--no-eval"],
     1, "paraphrase_prompts must be a list of texts"),
    ("prompt-number", ["edit", "--requests", "{file:prompt-int.json}", "--no-eval"], 1, "prompt must be text"),
    ("subject-null", ["edit", "--requests", "{file:subject-null.json}", "--no-eval"], 1, "record 0"),
    ("subject-missing", ["edit", "--requests", "{file:subject-missing.json}", "--no-eval"], 1, "subject is empty"),
    ("subject-not-in-prompt", ["edit", "--requests", "{file:subject-elsewhere.json}", "--no-eval"], 1,
     "is not in the prompt"),
    ("target-blank", ["edit", "--requests", "{file:target-empty.json}", "--no-eval"], 1, "target is empty"),
    ("target-null", ["edit", "--requests", "{file:target-null.json}", "--no-eval"], 1, "target is empty"),
    ("target-1.2MB", ["edit", "--requests", "{file:target-big.json}", "--no-eval"], 1, "at most 10,000"),
    ("prompt-1.2MB", ["edit", "--requests", "{file:prompt-big.json}", "--no-eval"], 1, "at most 10,000"),
    ("locality-prompt-number", ["edit", "--requests", "{file:locality-int.json}", "--no-eval"], 1, "must be text"),
    ("locality-a-number", ["edit", "--requests", "{file:locality-number.json}", "--no-eval"], 1,
     "must be a list or an object"),
    ("portability-prompt-number", ["edit", "--requests", "{file:portability-prompt-int.json}", "--no-eval"], 1,
     "portability[0] prompt must be text"),
    ("locality-too-few-answers", ["edit", "--requests", "{file:locality-answers-short.json}", "--no-eval"], 1,
     "2 prompts need as many ground_truth answers"),
    ("locality-answers-a-string", ["edit", "--requests", "{file:locality-answers-string.json}", "--no-eval"], 1,
     "2 prompts need as many ground_truth answers"),
    ("counterfact-rewrite-string", ["edit", "--requests", "{file:cf-string.json}", "--no-eval"], 1, "record 0"),
    ("counterfact-no-prompt", ["edit", "--requests", "{file:cf-no-prompt.json}", "--no-eval"], 1, "'prompt'"),
    ("jsonl-bad-line", ["edit", "--requests", "{file:bad-line.jsonl}", "--no-eval"], 1, "not valid JSON"),
    ("jsonl-list-line", ["edit", "--requests", "{file:list-line.jsonl}", "--no-eval"], 1, "record 1 is not"),
    ("json-nested-too-deep", ["edit", "--requests", "{file:deep.json}", "--no-eval"], 1, "nested too deeply"),
    ("requests-missing-file", ["edit", "--requests", "{file:no-such.json}", "--no-eval"], 2, "does not exist"),
    ("requests-directory", ["edit", "--requests", "{dir}", "--no-eval"], 2, "is a directory"),
    # -- one request on the command line --
    ("inline-two-braces", ["edit", "--prompt", "{} meets {}", "--subject", "France", "--target", "Japan"], 1,
     "'{}' once"),
    ("inline-named-brace", ["edit", "--prompt", "{x} France", "--subject", "France", "--target", "Japan"], 1,
     "no other braces"),
    ("inline-target-1.2MB", ["edit", *PROMPT, "--target", BIG, "--no-eval"], 1, "at most 10,000"),
    ("inline-prompt-1.2MB", ["edit", "--prompt", "France " + BIG, "--subject", "France", "--target", "Japan"], 1,
     "at most 10,000"),
    ("inline-subject-1.2MB", ["edit", "--prompt", "The capital city is France", "--subject", BIG, "--target",
                              "Japan"], 1, "at most 10,000"),
    ("inline-paraphrase-1.2MB", [*EDIT, "--paraphrase", BIG], 1, "at most 10,000"),
    ("inline-locality-1.2MB", [*EDIT, "--locality", BIG + "=>x"], 1, "at most 10,000"),
    ("inline-locality-no-prompt", [*EDIT, "--locality", "=>Germany"], 1, "locality[0] prompt is empty"),
    ("inline-subject-elsewhere", ["edit", "--prompt", "The capital city is France", "--subject", "Spain",
                                  "--target", "Japan"], 1, "is not in the prompt"),
    ("inline-target-blank", ["edit", *PROMPT, "--target", " "], 1, "target is empty"),
    ("inline-prompt-alone", ["edit", "--prompt", "The capital city is France"], 2, "go together"),
    ("edit-nothing", ["edit", "--no-eval"], 2, "--requests FILE"),
    # -- methods and options --
    ("unknown-method", [*EDIT, "--method", "nosuch"], 1, "unknown method 'nosuch'"),
    ("empty-method", [*EDIT, "--method", ""], 1, "unknown method ''"),
    ("batch-size-negative", [*EDIT, "--batch-size", "-1"], 2, "--batch-size"),
    ("batch-size-zero", [*EDIT, "--batch-size", "0"], 2, "--batch-size"),
    ("batch-size-word", [*EDIT, "--batch-size", "all"], 2, "is not a valid integer"),
    ("stats-samples-zero", [*EDIT, "--stats-samples", "0"], 2, "--stats-samples"),
    ("stats-samples-negative", [*EDIT, "--stats-samples", "-5"], 2, "--stats-samples"),
    ("stats-samples-huge", [*EDIT, "--stats-samples", "99999999999"], 2, "--stats-samples"),
    ("device-bogus", [*EDIT, "--device", "bogus"], 2, "'bogus' is not a device"),
    ("device-meta", [*EDIT, "--device", "meta"], 2, "not a device kedit runs on"),
    ("device-cuda-99", [*EDIT, "--device", "cuda:99"], 2, "CUDA device(s) here"),
    ("device-cpu-word", [*EDIT, "--device", "cpu:first"], 2, "is not a device"),
    ("dtype-float8", [*EDIT, "--dtype", "float8"], 2, "--dtype"),
    ("dtype-empty", [*EDIT, "--dtype", ""], 2, "--dtype"),
    ("set-no-equals", [*EDIT, "--set", "v_lr"], 2, "is not key=value"),
    ("set-no-key", [*EDIT, "--set", "=5"], 2, "is not key=value"),
    ("set-unknown-field", [*EDIT, "--set", "no_such_knob=1"], 1, "unknown ROMEHyperParams field"),
    ("set-layer-word", [*EDIT, "--set", "layer=middle"], 1, "layer must be an integer"),
    ("set-layer-negative", [*EDIT, "--set", "layer=-1"], 1, "layer must be >= 0"),
    ("set-layer-past-model", [*EDIT, "--set", "layer=99"], 1, "layer 99 is past the model's last layer"),
    ("grace-layer-past-model", [*EDIT, "--method", "grace", "--set", "layer=3"], 1, "(3 layers: 0..2)"),
    ("memit-layers-past-model", [*EDIT, "--method", "memit", "--set", "layers=[1, 99]"], 1, "layers 99 is past"),
    ("set-layer-huge", [*EDIT, "--set", "layer=1e12"], 1, "layer is out of range"),
    ("set-lr-inf", [*EDIT, "--set", "v_lr=inf"], 1, "v_lr must be a finite number"),
    ("set-lr-nan", [*EDIT, "--set", "v_lr=nan"], 1, "v_lr must be a finite number"),
    ("set-lr-1e308", [*EDIT, "--set", "v_lr=1e308"], 1, "v_lr must be a finite number"),
    ("set-lr-1e39", [*EDIT, "--set", "v_lr=1e39"], 1, "v_lr must be a finite number"),
    ("set-lr-negative", [*EDIT, "--set", "v_lr=-1"], 1, "v_lr must be > 0"),
    ("set-lr-zero", [*EDIT, "--set", "v_lr=0"], 1, "v_lr must be > 0"),
    ("set-steps-1e12", [*EDIT, "--set", "v_num_grad_steps=1e12"], 1, "v_num_grad_steps must be >= 1 and <= 100000"),
    ("set-steps-zero", [*EDIT, "--set", "v_num_grad_steps=0"], 1, "v_num_grad_steps must be >= 1"),
    ("set-steps-fraction", [*EDIT, "--set", "v_num_grad_steps=2.5"], 1, "must be an integer"),
    ("set-steps-inf", [*EDIT, "--set", "v_num_grad_steps=1e400"], 1, "must be an integer"),
    ("set-bool-maybe", [*EDIT, "--set", "mom2_adjustment=maybe"], 1, "must be true or false"),
    ("set-samples-negative", [*EDIT, "--set", "mom2_n_samples=-3"], 1, "mom2_n_samples must be >= 1"),
    ("set-floors-zero", [*EDIT, "--set", "escalate_gain_floors=[0, 1]"], 1, "escalate_gain_floors must be > 0"),
    ("set-floors-nan", [*EDIT, "--set", "escalate_gain_floors=[.nan]"], 1, "must be a finite number"),
    ("set-list-malformed", [*EDIT, "--set", "escalate_gain_floors=[0.5, 1"], 1, "is not plain YAML"),
    ("set-python-tag", [*EDIT, "--set", "escalate_gain_floors=!!python/object/apply:os.getcwd []"], 1,
     "is not plain YAML"),
    ("set-kl-prompt-no-slot", [*EDIT, "--set", "kl_prompt=is a"], 1, "kl_prompt must contain"),
    ("set-v-dtype-int8", [*EDIT, "--set", "v_dtype=int8"], 1, "v_dtype must be one of"),
    ("set-overlap-inf", [*EDIT, "--set", "protect_overlap=-inf"], 1, "must be a finite number"),
    ("ft-norm-constraint-nan", [*EDIT, "--method", "ft", "--set", "norm_constraint=nan"], 1,
     "norm_constraint must be a finite number"),
    ("ft-lr-1e308", [*EDIT, "--method", "ft", "--set", "lr=1e308"], 1, "lr must be a finite number"),
    ("ft-num-steps-1e12", [*EDIT, "--method", "ft", "--set", "num_steps=1e12"], 1, "num_steps must be >= 1 and <="),
    ("ft-batch-size-zero", [*EDIT, "--method", "ft", "--set", "batch_size=0"], 1, "batch_size must be >= 1"),
    ("ft-layers-empty", [*EDIT, "--method", "ft", "--set", "layers=[]"], 1, "layers must not be empty"),
    ("ft-layers-past-model", [*EDIT, "--method", "ft", "--set", "layers=[99]"], 1, "layers 99 is past"),
    ("ft-layers-negative", [*EDIT, "--method", "ft", "--set", "layers=[-2]"], 1, "layers must be >= 0"),
    ("grace-edit-lr-inf", [*EDIT, "--method", "grace", "--set", "edit_lr=inf"], 1, "edit_lr must be a finite"),
    ("grace-eps-zero", [*EDIT, "--method", "grace", "--set", "eps_init=0"], 1, "eps_init must be > 0"),
    ("grace-n-iter-negative", [*EDIT, "--method", "grace", "--set", "n_iter=-3"], 1, "n_iter must be >= 1"),
    ("grace-val-init", [*EDIT, "--method", "grace", "--set", "val_init=hot"], 1, "val_init must be"),
    ("grace-tol-nan", [*EDIT, "--method", "grace", "--set", "duplicate_tol=nan"], 1, "must be a finite number"),
    ("memit-layers-descending", [*EDIT, "--method", "memit", "--set", "layers=[2, 1]"], 1, "ascending"),
    ("memit-lambda-inf", [*EDIT, "--method", "memit", "--set", "mom2_update_weight=-inf"], 1, "finite number"),
    ("alphaedit-threshold-zero", [*EDIT, "--method", "alphaedit", "--set", "nullspace_threshold=0"], 1,
     "nullspace_threshold must be > 0"),
    ("alphaedit-l2-nan", [*EDIT, "--method", "alphaedit", "--set", "L2=nan"], 1, "L2 must be a finite number"),
    ("mend-no-editor", [*EDIT, "--method", "mend"], 1, "editor"),
    ("mend-unknown-editor", [*EDIT, "--method", "mend", "--editor", "abcdef12"], 1, "no editor 'abcdef12'"),
    ("instructedit-task-blank", [*EDIT, "--method", "instructedit", "--set", "task= "], 1, "task must not be"),
    ("hparams-python-tag", [*EDIT, "--hparams", "{file:python-tag.yaml}"], 1, "is not plain YAML"),
    ("hparams-malformed", [*EDIT, "--hparams", "{file:malformed.yaml}"], 1, "is not plain YAML"),
    ("hparams-a-list", [*EDIT, "--hparams", "{file:list.yaml}"], 1, "expected a mapping"),
    ("hparams-not-utf8", [*EDIT, "--hparams", "{file:ff.yaml}"], 1, "can't decode"),
    ("hparams-unknown-key", [*EDIT, "--hparams", "{file:unknown.yaml}"], 1, "no_such_knob"),
    ("hparams-inf", [*EDIT, "--hparams", "{file:inf.yaml}"], 1, "v_lr must be a finite number"),
    ("hparams-nan", [*EDIT, "--hparams", "{file:nan.yaml}"], 1, "kl_factor must be a finite number"),
    ("hparams-missing", [*EDIT, "--hparams", "{file:no-such.yaml}"], 2, "does not exist"),
    ("hparams-directory", [*EDIT, "--hparams", "{dir}"], 2, "is a directory"),
    ("corpus-missing", [*EDIT, "--corpus", "{file:no-such.txt}"], 2, "does not exist"),
    # -- reading commands --
    ("log-count-negative", ["log", "-n", "-1"], 2, "--max-count"),
    ("log-count-word", ["log", "-n", "ten"], 2, "is not a valid integer"),
    ("log-count-huge", ["log", "-n", "99999999999999999999"], 2, "--max-count"),
    ("reflog-count-huge", ["reflog", "-n", "99999999999999999999"], 2, "--max-count"),
    ("log-unknown-rev", ["log", "nosuch"], 1, "unknown revision 'nosuch'"),
    ("log-past-initial", ["log", "HEAD~5"], 1, "past the initial commit"),
    ("reflog-count-negative", ["reflog", "-n", "-5"], 2, "--max-count"),
    ("reflog-unknown-ref", ["reflog", "nosuch"], 1, "no ref named 'nosuch'"),
    ("show-unknown-rev", ["show", "nosuch"], 1, "unknown revision"),
    ("show-empty-rev", ["show", ""], 1, "empty revision"),
    ("diff-unknown-rev", ["diff", "nosuch"], 2, "unknown revision"),
    ("export-unknown-rev", ["export", "nosuch", "{out}"], 1, "unknown revision"),
    ("export-shard-size-word", ["export", "HEAD", "{out}", "--max-shard-size", "big"], 2, "is not a size"),
    ("export-shard-size-negative", ["export", "HEAD", "{out}", "--max-shard-size", "-5GB"], 2, "is not a size"),
    ("export-shard-size-zero", ["export", "HEAD", "{out}", "--max-shard-size", "0"], 2, "at least 1"),
    ("export-into-a-file", ["export", "HEAD", "{file:ff.json}"], 1, "ff.json"),
    ("unknown-command", ["frobnicate"], 2, "No such command 'frobnicate'"),
    ("unknown-option", ["log", "--frobnicate"], 2, "No such option"),
    ("unknown-global-option", ["--frobnicate", "log"], 2, "No such option"),
    # -- writing commands --
    ("checkout-unknown-rev", ["checkout", "nosuch"], 1, "unknown revision"),
    ("reset-unknown-rev", ["reset", "nosuch"], 1, "unknown revision"),
    ("revert-unknown-rev", ["revert", "nosuch"], 1, "unknown revision"),
    ("revert-initial", ["revert", "HEAD~1"], 1, "cannot be reverted"),
    ("branch-delete-unknown", ["branch", "-d", "nosuch"], 1, "no branch named 'nosuch'"),
    ("tag-delete-unknown", ["tag", "-d", "nosuch"], 1, "no tag named 'nosuch'"),
    ("tag-existing", ["tag", "v1"], 1, "already exists"),
    ("gc-reflog-expire-huge", ["gc", "--reflog-expire", "99999999999d"], 2, "longer than 100 years"),
    ("gc-prune-huge", ["gc", "--prune", "99999999999999999999w"], 2, "longer than 100 years"),
    ("gc-prune-word", ["gc", "--prune", "soon"], 2, "is not an age"),
    ("gc-prune-negative", ["gc", "--prune", "-1d"], 2, "is not an age"),
    ("probe-rm-word", ["probe", "rm", "first"], 2, "is not a valid integer"),
    ("probe-rm-huge", ["probe", "rm", "99999999999999999999999"], 2, "PROBE_ID"),
    ("probe-rm-unknown", ["probe", "rm", "4242"], 1, "no probe with id 4242"),
    ("probe-add-answers-mismatch", ["probe", "add", "--prompt", "a", "--answer", "x", "--answer", "y"], 2,
     "one --answer per --prompt"),
    ("probe-add-kind", ["probe", "add", "--prompt", "a", "--answer", "x", "--kind", "bogus"], 2, "--kind"),
    ("check-threshold-high", ["check", "--threshold", "2"], 2, "--threshold"),
    ("check-threshold-negative", ["check", "--threshold", "-0.5"], 2, "--threshold"),
    ("check-device-bogus", ["check", "--device", "bogus"], 2, "is not a device"),
    ("eval-unknown-rev", ["eval", "nosuch"], 1, "unknown revision"),
    ("eval-suite-not-utf8", ["eval", "--suite", "{file:ff.json}"], 1, "is not UTF-8 text"),
    ("eval-suite-null-paraphrase", ["eval", "--suite", "{file:para-null.json}"], 1, "must be text"),
    ("eval-suite-missing", ["eval", "--suite", "{file:no-such.json}"], 2, "does not exist"),
    ("stats-layer-negative", ["stats", "--layer", "-1"], 2, "--layer"),
    ("stats-samples-zero-texts", ["stats", "--samples", "0"], 2, "--samples"),
    ("stats-unknown-method", ["stats", "--method", "nosuch"], 1, "unknown method"),
    ("stats-layer-past-model", ["stats", "--layer", "99"], 1, "--layer 99 is past the model's last layer"),
    ("stats-empty-corpus", ["stats", "--corpus", "{file:blank.json}", "--samples", "4"], 1, "gave no texts"),
    ("probe-add-empty-prompt", ["probe", "add", "--prompt", "", "--answer", "x"], 1, "non-empty prompt"),
    ("export-into-a-device", ["export", "HEAD", "/dev/null"], 1, "Not a directory"),
    ("train-editor-not-trainable", ["train-editor", "--method", "rome", "--data", "{file:good.json}"], 2,
     "--method"),
    ("train-editor-bad-data", ["train-editor", "--method", "mend", "--data", "{file:ff.json}", "--device", "cpu"],
     1, "is not UTF-8 text"),
    ("train-editor-rank-zero", ["train-editor", "--method", "mend", "--data", "{file:good.json}",
                                "--device", "cpu", "--set", "rank=0"], 1, "rank must be >= 1"),
    ("train-editor-layers-past-model", ["train-editor", "--method", "mend", "--data", "{file:good.json}",
                                        "--device", "cpu", "--set", "layers=[2, 3]"], 1, "layers 3 is past"),
    ("train-editor-lr-nan", ["train-editor", "--method", "mend", "--data", "{file:good.json}",
                             "--device", "cpu", "--set", "lr=nan"], 1, "lr must be a finite number"),
    ("train-editor-device-bogus", ["train-editor", "--method", "mend", "--data", "{file:ff.json}",
                                   "--device", "gpu0"], 2, "is not a device"),
]

# `kedit init` of what is not a model: the target must not appear.
INIT_CASES: list[tuple[str, list[str], str]] = [
    ("noise", ["{file:noise.safetensors}"], "noise.safetensors"),
    ("empty", ["{file:empty.safetensors}"], "empty.safetensors"),
    ("huge-header", ["{file:huge-header.safetensors}"], "huge-header.safetensors"),
    ("short-header", ["{file:short-header.safetensors}"], "short-header.safetensors"),
    ("header-not-json", ["{file:not-json-header.safetensors}"], "not-json-header.safetensors"),
    ("offsets-past-end", ["{file:bad-offsets.safetensors}"], "bad-offsets.safetensors"),
    ("dtype-bogus", ["{file:noise.safetensors}", "--dtype", "float8"], "--dtype"),
    ("missing", ["{file:no-such.safetensors}"], "is not a file, a folder or a model id"),
]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEDIT_DEBUG", raising=False)  # it turns error lines into tracebacks


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bad-inputs")
    for name, data in FILES.items():
        (folder / name).write_bytes(data)
    (folder / "a-directory").mkdir()
    return folder


@pytest.fixture(scope="module")
def shared_repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    """One repository for every row (each row leaves it unchanged, which is what it tests):
    a tiny Llama with a tokenizer, one dense edit, tag v1."""
    model_dir = tmp_path_factory.mktemp("tiny-tok-llama-bad-inputs")
    tok = make_tokenizer()
    make_model("llama", len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    repo = Repository.init(tmp_path_factory.mktemp("bad-inputs-repo") / "work", str(model_dir), progress=False)
    repo.commit({NORM: Dense(torch.full((32,), 1e-3))}, message="nudge the norm")
    repo.create_tag("v1")
    return repo


def _fill(args: list[str], files: Path, out: Path) -> list[str]:
    """The row's arguments with `{file:NAME}`, `{dir}` and `{out}` made paths."""
    def path(arg: str) -> str:
        if arg.startswith("{file:") and arg.endswith("}"):
            return str(files / arg[len("{file:"):-1])
        return {"{dir}": str(files / "a-directory"), "{out}": str(out)}.get(arg, arg)

    return [path(a) for a in args]


@pytest.mark.parametrize(("args", "code", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(shared_repo: Repository, files: Path, tmp_path: Path,
                                                   args: list[str], code: int, says: str) -> None:
    out = tmp_path / "out"
    before = snapshot(shared_repo)
    line = refused(*_fill(args, files, out), repo=shared_repo, code=code)
    assert says in line, line
    assert snapshot(shared_repo) == before
    assert not out.exists()


@pytest.mark.parametrize(("args", "says"), [c[1:] for c in INIT_CASES], ids=[c[0] for c in INIT_CASES])
def test_init_of_what_is_not_a_model(files: Path, tmp_path: Path, args: list[str], says: str) -> None:
    target = tmp_path / "work"
    line = refused("--repo", str(target), "init", *_fill(args, files, tmp_path / "out"),
                   code=2 if "--dtype" in args else 1)
    assert says in line, line
    assert not (target / ".kedit").exists(), "a refused init left a repository behind"


def test_the_table_is_large_enough() -> None:
    assert len(CASES) + len(INIT_CASES) >= 100
    assert len({c[0] for c in CASES}) == len(CASES), "two rows share an id"


# -- nothing non-finite is committed -------------------------------------------------------------


def test_grace_edit_lr_inf_is_refused_before_training(shared_repo: Repository) -> None:
    """The attack: `edit_lr=inf` trained a codebook of NaN, exit 0, and fsck said ok."""
    before = snapshot(shared_repo)
    line = refused(*EDIT, "--method", "grace", "--set", "edit_lr=inf", repo=shared_repo)
    assert "bad hyper-parameters for grace: edit_lr must be a finite number" in line
    assert snapshot(shared_repo) == before


def test_ft_norm_constraint_nan_does_not_lift_the_limit(shared_repo: Repository) -> None:
    """The attack: NaN passed `norm_constraint < 0` unseen and the L-inf clamp became a no-op."""
    before = snapshot(shared_repo)
    line = refused(*EDIT, "--method", "ft", "--set", "norm_constraint=nan", repo=shared_repo)
    assert "bad hyper-parameters for ft: norm_constraint must be a finite number" in line
    assert snapshot(shared_repo) == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_adapter_memory_and_delta_are_not_committed(shared_repo: Repository, bad: float) -> None:
    codebook = {"keys": torch.zeros(1, 64), "values": torch.full((1, 32), bad), "radii": torch.ones(1)}
    tensors = torch.ones(32)
    tensors[3] = bad
    attempts = {
        "the grace adapter": lambda: shared_repo.commit({}, adapters=[Adapter("grace", codebook, {"module": "m"})]),
        "the alphaedit memory": lambda: shared_repo.commit({NORM: Dense(torch.full((32,), 1e-3))},
                                                           method="alphaedit", memory={"keys": tensors}),
        f"the delta for {NORM}": lambda: shared_repo.commit({NORM: Dense(tensors)}),
        "the delta for model.layers.0.mlp.down_proj.weight": lambda: shared_repo.commit(
            {"model.layers.0.mlp.down_proj.weight": LowRank(torch.ones(32, 1), tensors[3:4].expand(1, 64).clone())}),
    }
    before = snapshot(shared_repo)
    for what, attempt in attempts.items():
        with pytest.raises(DeltaError, match="non-finite") as refusal:
            attempt()
        assert str(refusal.value).startswith(what) and "nothing was committed" in str(refusal.value)
        assert snapshot(shared_repo) == before, what


def test_finite_factors_whose_product_overflows_are_not_committed(shared_repo: Repository) -> None:
    before = snapshot(shared_repo)
    factors = LowRank(torch.full((32, 1), 1e20), torch.full((1, 64), 1e20))  # 1e40 is inf in float32
    with pytest.raises(DeltaError, match="produces non-finite values"):
        shared_repo.commit({"model.layers.0.mlp.down_proj.weight": factors})
    assert snapshot(shared_repo) == before


def test_a_non_finite_trained_editor_is_not_stored(shared_repo: Repository) -> None:
    state = {"mlp.weight": torch.tensor([[1.0, float("nan")]])}
    before = snapshot(shared_repo)
    with pytest.raises(DeltaError, match="the trained mend editor holds non-finite values"):
        store_editor(shared_repo, "mend", state, {"rank": 1}, shared_repo.head(), "0" * 32, {}, {})
    assert snapshot(shared_repo) == before


@pytest.mark.parametrize("args", [[], ["probe"]])
def test_a_command_group_alone_shows_its_help_not_an_error(args: list[str]) -> None:
    result = kedit(*args)
    assert "[OPTIONS] COMMAND [ARGS]..." in result.output and "kedit: error" not in result.output
