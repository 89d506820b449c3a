"""
Tasks with a verifier: the embedded n-digit addition task (the default, offline, seconds on a CPU) and datasets of
solutions whose final number can be checked (GSM8K). Each gives held-out prompts, an exact checker, and
on-policy preference pairs built from a model's own mistakes. For the addition task, also a hidden judge that
only compares answers (JudgedPairs): preference pairs when comparisons are all there is.

Then evaluation, shared by sft.py and dpo.py: exact-match accuracy of greedy answers on a task, and the
training loss (with its metrics) over held-out rows. Both run the plain model, in eval mode, without
gradients, and put it back in training mode after. Also the completions dpo.py builds its on-policy pairs from
(complete), generated the same way, and a point of the reward-KL frontier (sampled_kl): what the policy's
samples earn and how far they are from a reference's, for the online rounds and the notebooks.
"""

import math
import random
import re
from decimal import Decimal, InvalidOperation

import torch

from configurator import UserError
from data import collate
from logprobs import summed_logps, token_logps
from nanopo.logger import Progress
from nanopo.runtime import all_reduce_sum, unwrap

# -----------------------------------------------------------------------------------------------------------
# The embedded task: n-digit addition with an exact verifier

class AdditionTask:
    """'a+b=' -> 'c' for n-digit a and b. Every problem (a, b) is enumerated once, shuffled with `seed`, and the
    first `n_eval` go to the held-out split, so train and held-out are disjoint by problem.

    The SFT demonstrations are imperfect in a systematic way, as human or model-written data often is: with
    probability `slip_prob` a demonstration gives the 'forgot every carry' answer (each digit is
    (x_i + y_i) mod 10, carries dropped). That answer is wrong whenever the problem has a carry, so the SFT model
    learns the slip; DPO pairs then show the correct answer above a wrong one and teach it out again.
    With slip='each' the demonstrations slip carry by carry instead: every carry is dropped on its own with
    probability `slip_prob` (47+85 -> '132', '122', '32' or '22'), so a model's answers are wrong in several ways
    at once and two of them are seldom one right and one wrong (the judged-pairs recipe,
    docs/judged_pairs.md)."""

    def __init__(self, n_digits=2, n_eval=1000, seed=1234, reward="log_error"):
        if reward not in ("log_error", "digits"):
            raise UserError(f"unknown judge reward '{reward}': expected 'log_error' or 'digits'")
        self.reward_kind = reward  # what reward() grades by (the judged pairs' hidden judge, task_reward)
        lo, hi = 10 ** (n_digits - 1), 10 ** n_digits
        problems = [(a, b) for a in range(lo, hi) for b in range(lo, hi)]
        random.Random(seed).shuffle(problems)
        if n_eval >= len(problems):
            raise UserError(f"n_eval={n_eval} leaves no training problems ({len(problems)} in all)")
        self.eval_problems, self.train_problems = problems[:n_eval], problems[n_eval:]
        self.n_digits = n_digits
        self.eval_prompts = [self.prompt(a, b) for a, b in self.eval_problems]  # what evaluation asks
        self.max_new_tokens = n_digits + 3  # the longest answer plus EOS, with room for a wrong longer one

    @staticmethod
    def prompt(a, b):
        return f"{a}+{b}="

    @staticmethod
    def answer(a, b):
        return str(a + b)

    @staticmethod
    def no_carry_answer(a, b):
        """The slip: add digit by digit and forget every carry (47+85 -> '22')."""
        digits, place = 0, 1
        while a or b:
            digits += ((a % 10 + b % 10) % 10) * place
            a, b, place = a // 10, b // 10, place * 10
        return str(digits)

    @staticmethod
    def each_carry_slip(a, b, slip_prob, rng):
        """Add digit by digit, dropping each carry on its own with probability slip_prob (0: the sum)."""
        digits, place, carry = 0, 1, 0
        while a or b or carry:
            s = a % 10 + b % 10 + carry
            digits += (s % 10) * place
            carry = int(s >= 10 and rng.random() >= slip_prob)
            a, b, place = a // 10, b // 10, place * 10
        return str(digits)

    @staticmethod
    def parse(prompt):
        a, b = prompt.rstrip("=").split("+")
        return int(a), int(b)

    def is_correct(self, prompt, completion):
        return completion.strip() == self.answer(*self.parse(prompt))

    def reward(self, prompt, completion):
        """The graded true reward of an answer, 0 for the exact sum. 'log_error': -log(1 + |answer - sum|),
        falling slowly with the error (-0.69 one off, -2.4 ten off, -4.6 a hundred off). 'digits': minus the
        number of places, from the units up, where the answer's digit is not the sum's (a missing or extra digit
        counts), so each slipped carry costs about 1 wherever it is (1132 -> 1122: -1, 132: -1, 22: -3). An
        answer that is no number (an empty one included) gets a floor below every answer the model can write:
        -log(1 + 10**max_new_tokens), or -max_new_tokens places."""
        text = completion.strip()
        if not (text.isascii() and text.isdigit()):  # ('²'.isdigit() is True, but int('²') fails)
            return -math.log1p(10 ** self.max_new_tokens) if self.reward_kind == "log_error" else -self.max_new_tokens
        truth = self.answer(*self.parse(prompt))
        if self.reward_kind == "log_error":
            return -math.log1p(abs(int(text) - int(truth)))
        a, b = text[::-1], truth[::-1]  # units first
        return -sum(a[i:i + 1] != b[i:i + 1] for i in range(max(len(a), len(b))))

    def sft_rows(self, slip_prob, seed, slip="every"):
        """One demonstration per training problem; returns (rows, n_wrong) with rows [{'prompt', 'response'}].
        slip='every': a slipping demonstration forgets every carry; 'each': each carry slips on its own."""
        if slip not in ("every", "each"):
            raise UserError(f"unknown slip '{slip}': expected 'every' or 'each'")
        rng = random.Random(seed)
        rows, n_wrong = [], 0
        for a, b in self.train_problems:
            if slip == "each":
                response = self.each_carry_slip(a, b, slip_prob, rng)
            else:
                response = self.no_carry_answer(a, b) if rng.random() < slip_prob else self.answer(a, b)
            n_wrong += response != self.answer(a, b)
            rows.append({"prompt": self.prompt(a, b), "response": response})
        return rows, n_wrong

    def corrupt(self, answer, rng):
        """A plausible wrong answer: one digit changed (never to a leading zero)."""
        i = rng.randrange(len(answer))
        choices = [d for d in "0123456789" if d != answer[i] and not (i == 0 and d == "0" and len(answer) > 1)]
        return answer[:i] + rng.choice(choices) + answer[i + 1:]

    def build_pairs(self, generate_fn, n_prompts, n_samples, temperature, seed):
        """Preference pairs for `n_prompts` training problems: chosen = the verified correct answer; rejected =
        the model's own greedy answer when it is wrong (an on-policy negative), else the first wrong one of
        `n_samples` samples at `temperature`, else a one-digit corruption of the correct answer.
        generate_fn(prompts, temperature=t) -> completions (strings). Without a model to sample
        (generate_fn=None, one-stage ORPO from scratch) the rejected answer is the demonstrations' slip where it is
        wrong, else a corruption. Returns (rows, counts by source)."""
        rng = random.Random(seed)
        problems = rng.sample(self.train_problems, min(n_prompts, len(self.train_problems)))
        prompts = [self.prompt(a, b) for a, b in problems]
        if generate_fn is not None:
            outputs = [("greedy", generate_fn(prompts, temperature=0.0))]
            outputs += [("sampled", generate_fn(prompts, temperature=temperature)) for _ in range(n_samples)]
        else:
            outputs = [("slip", [self.no_carry_answer(a, b) for a, b in problems])]
        rows, counts = [], {"greedy": 0, "sampled": 0, "slip": 0, "corruption": 0}
        for i, (prompt, (a, b)) in enumerate(zip(prompts, problems)):
            chosen = self.answer(a, b)
            source, rejected = next(((src, out[i].strip()) for src, out in outputs
                                     if out[i].strip() and out[i].strip() != chosen), ("corruption", None))
            if rejected is None:
                rejected = self.corrupt(chosen, rng)
            counts[source] += 1
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        return rows, counts


# -----------------------------------------------------------------------------------------------------------
# When comparisons are all there is: the model's own samples, ranked by a hidden judge

def bradley_terry(r1, r2, tau):
    """P(y1 is preferred to y2) = sigmoid((r1 - r2) / tau) (Bradley-Terry with temperature tau: the judge's noise;
    tau -> 0 always picks the better answer, a large tau is a coin flip)."""
    return 1 / (1 + math.exp(-max(min((r1 - r2) / tau, 700.0), -700.0)))


def judged_pairs(task, generate_fn, n_prompts, n_samples, temperature, tau, seed, unpaired=False):
    """Preference data with no reference answer in it: for `n_prompts` training problems, n_samples (>= 2) of
    the model's own answers at `temperature` (generate_fn(prompts, temperature=t) -> completions), labelled by a
    hidden judge who knows task.reward but shows only its verdicts:
      - pairs (default): two distinct samples of a prompt drawn at random; y1 becomes chosen with probability
        bradley_terry(r1, r2, tau). Equal rewards (a tie: e.g. 105 and 107 for 106) get the same coin flip, and
        are counted. A prompt whose samples are all alike gives no pair, counted.
      - unpaired (KTO's natural data): every distinct sample of a prompt gets a thumbs up with probability
        bradley_terry(r, r_typical, tau), r_typical the mean reward of all the samples drawn: better than a
        typical answer, or not.
    An empty sample (EOS first) is an answer like any other: the judge ranks it at the floor, and it trains as a
    response of EOS alone (counted). Returns (rows, counts): rows {'prompt', 'chosen', 'rejected'} or
    {'prompt', 'completion', 'label'}; counts, for the report line, include the share of chosen answers that are
    exactly right, which only the judge knows."""
    if not hasattr(task, "reward"):
        raise UserError("pairs='judged' needs the embedded task, whose judge grades answers: not a dataset")
    if n_samples < 2:
        raise UserError(f"pairs='judged' compares two of the model's own samples: n_samples >= 2, not {n_samples}")
    rng = random.Random(seed)
    problems = rng.sample(task.train_problems, min(n_prompts, len(task.train_problems)))
    prompts = [task.prompt(a, b) for a, b in problems]
    samples = [generate_fn(prompts, temperature=temperature) for _ in range(n_samples)]
    counts = {"prompts": len(prompts), "empty samples": sum(not s[i].strip() for s in samples for i in
                                                             range(len(prompts)))}
    distinct = [list(dict.fromkeys(s[i].strip() for s in samples)) for i in range(len(prompts))]
    if unpaired:
        typical = sum(task.reward(p, y) for p, ys in zip(prompts, distinct) for y in ys) / sum(map(len, distinct))
        rows = [{"prompt": p, "completion": y, "label": rng.random() < bradley_terry(task.reward(p, y), typical, tau)}
                for p, ys in zip(prompts, distinct) for y in ys]
        counts.update(examples=len(rows), thumbs_up=sum(r["label"] for r in rows))
        return rows, counts
    rows, ties, correct = [], 0, 0
    for prompt, answers in zip(prompts, distinct):
        if len(answers) < 2:
            continue
        y1, y2 = rng.sample(answers, 2)
        r1, r2 = task.reward(prompt, y1), task.reward(prompt, y2)
        ties += r1 == r2
        chosen, rejected = (y1, y2) if rng.random() < bradley_terry(r1, r2, tau) else (y2, y1)
        correct += task.is_correct(prompt, chosen)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    counts.update({"pairs": len(rows), "no two distinct samples": len(prompts) - len(rows), "ties": ties,
                   "chosen exactly right (hidden)": correct})
    return rows, counts


# -----------------------------------------------------------------------------------------------------------
# Datasets of solutions with a checkable final number (GSM8K)

# 1,234 / -3 / 2.50 / .5; a sentence's final '.' is left out, and a '-' only signs a number that follows no
# word or digit ('3-4' ends in 4, not -4)
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def _clean_number(s):
    """'1,234' -> '1234', '18.00' -> '18', '2.50' -> '2.5', '007' -> '7', '-0' -> '0': one spelling per value,
    so answers compare as strings."""
    try:
        value = Decimal(s.replace(",", ""))
    except InvalidOperation:
        return s
    return "0" if value == 0 else format(value.normalize(), "f")


def gsm8k_answer(text):
    """The final answer of a GSM8K solution ('... #### 1,234' -> '1234'), or None when there is no '#### N'."""
    if "####" not in text:
        return None
    m = _NUMBER.search(text.split("####")[-1])
    return _clean_number(m.group()) if m else None


def extract_final_number(completion):
    """The number a completion answers with, for grading: the one after '####' when there is one, else the last
    number in the text; None when it has no number."""
    answer = gsm8k_answer(completion)
    if answer is not None:
        return answer
    numbers = _NUMBER.findall(completion)
    return _clean_number(numbers[-1]) if numbers else None


class AnswerTask:
    """A task whose rows carry a reference answer that can be checked by its final number, as GSM8K's do
    ('... #### 42'): the same interface as AdditionTask (eval_prompts, is_correct, build_pairs), so sft.py and
    dpo.py evaluate held-out task_accuracy and build on-policy pairs for it the same way.
    train_rows / eval_rows: SFT rows {'prompt', 'response'} (load_rows(..., kind='sft'))."""

    def __init__(self, train_rows, eval_rows, n_eval=None, max_new_tokens=256):
        self.train_rows = [r for r in train_rows if gsm8k_answer(r["response"]) is not None]
        self.answers = {r["prompt"]: gsm8k_answer(r["response"]) for r in eval_rows[:n_eval]
                        if gsm8k_answer(r["response"]) is not None}
        self.answers.update({r["prompt"]: gsm8k_answer(r["response"]) for r in self.train_rows})
        self.eval_prompts = [r["prompt"] for r in eval_rows[:n_eval] if gsm8k_answer(r["response"]) is not None]
        if not self.eval_prompts:
            raise UserError("no held-out row has a final answer ('#### N') to check completions against")
        self.max_new_tokens = max_new_tokens

    def is_correct(self, prompt, completion):
        return extract_final_number(completion) == self.answers[prompt]

    def build_pairs(self, generate_fn, n_prompts, n_samples, temperature, seed):
        """On-policy pairs: chosen = the reference solution; rejected = the model's greedy completion when its
        final number is wrong, else the first wrong one of n_samples samples. A prompt the model always gets
        right gets no pair (there is no safe way to corrupt a worked solution); it is counted as 'all correct'."""
        rng = random.Random(seed)
        rows_in = rng.sample(self.train_rows, min(n_prompts, len(self.train_rows)))
        prompts = [r["prompt"] for r in rows_in]
        if generate_fn is None:
            raise UserError("pairs for a dataset of solutions are sampled from the SFT model: use init_from='sft'")
        outputs = [("greedy", generate_fn(prompts, temperature=0.0))]
        outputs += [("sampled", generate_fn(prompts, temperature=temperature)) for _ in range(n_samples)]
        rows, counts = [], {"greedy": 0, "sampled": 0, "all correct": 0}
        for i, r in enumerate(rows_in):
            wrong = next(((src, out[i]) for src, out in outputs
                          if out[i].strip() and not self.is_correct(r["prompt"], out[i])), None)
            if wrong is None:
                counts["all correct"] += 1
                continue
            counts[wrong[0]] += 1
            rows.append({"prompt": r["prompt"], "chosen": r["response"], "rejected": wrong[1]})
        return rows, counts


# -----------------------------------------------------------------------------------------------------------
# Evaluation: answers generated by the plain model, scored; the held-out loss; a reward-KL point

@torch.no_grad()
def complete(model, prompts, tok, rt, max_new_tokens, label, temperature=0.0, generator=None, batch_size=500):
    """The plain model's completions (text) of `prompts`, greedy (temperature 0) or sampled, batch_size prompts
    at a time, in eval mode, with progress lines under `label` (which may name {temperature}): for evaluation,
    and for dpo.py's on-policy pairs."""
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    outs, progress = [], Progress(label.format(temperature=float(temperature)), len(prompts), rt.master)
    for i in range(0, len(prompts), batch_size):
        with rt.autocast():
            outs += raw.generate([tok.encode(p) for p in prompts[i:i + batch_size]], max_new_tokens, tok.eos_id,
                                 tok.pad_id, temperature=temperature, generator=generator)
        progress.update(len(outs))
    raw.train(was_training)
    return [tok.decode(o) for o in outs]


@torch.no_grad()
def evaluate_task(model, task, tok, rt, reward=False, batch_size=500):
    """{'task_accuracy': held-out exact-match accuracy (0-1) of greedy completions of task.eval_prompts, checked
    by task.is_correct}, and with reward=True 'task_reward': their mean graded reward (task.reward, what a judge
    ranks by). Under DDP each rank takes every world_size-th prompt and the sums are reduced, so no rank waits
    on another's share. Under FSDP2 every forward is a collective, so every rank generates for every prompt
    instead (identical weights and inputs give identical outputs and the same number of steps)."""
    rank, world = (0, 1) if rt.fsdp else (rt.rank, rt.world_size)
    prompts = task.eval_prompts[rank::world]
    texts = complete(model, prompts, tok, rt, task.max_new_tokens, "evaluating held-out prompts", batch_size=batch_size)
    sums = torch.tensor([sum(task.is_correct(p, t) for p, t in zip(prompts, texts)),
                         sum(task.reward(p, t) for p, t in zip(prompts, texts)) if reward else 0.0, len(prompts)],
                        dtype=torch.float64, device=rt.device)
    if not rt.fsdp:
        sums = all_reduce_sum(sums, rt)
    results = {"task_accuracy": (sums[0] / sums[2]).item()}
    if reward:
        results["task_reward"] = (sums[1] / sums[2]).item()
    return results


@torch.no_grad()
def evaluate_loss(model, loss_of_rows, n_rows, batch_size, rt, row_weights=None):
    """Held-out loss and metrics: loss_of_rows(indices) -> (loss, {name: value}) over held-out rows `indices`,
    for every row, named eval_<name> (TRL's eval_loss, eval_rewards/accuracies, ...). Batch means are weighted
    by their rows, or by the sum of row_weights over their rows (SFT: response tokens), so they do not depend on
    batch_size. Every rank computes the whole (small) held-out set, so there is no collective it could miss."""
    raw = unwrap(model)
    was_training = raw.training
    raw.eval()
    totals, names = None, None
    starts = list(range(0, n_rows, batch_size))
    if len(starts) > 1 and n_rows - starts[-1] == 1:
        starts.pop()  # no batch of one row: it joins the one before (KTO's KL estimate needs two rows)
    weight = (lambda indices: sum(row_weights[i] for i in indices)) if row_weights else len
    for start, end in zip(starts, starts[1:] + [n_rows]):
        indices = list(range(start, end))
        with rt.autocast():
            loss, metrics = loss_of_rows(indices)
        values = torch.stack([loss.float()] + [v.float() for v in metrics.values()]) * weight(indices)
        totals, names = (values if totals is None else totals + values), ["loss", *metrics]
    raw.train(was_training)
    total_weight = weight(list(range(n_rows)))
    return {f"eval_{k}": v / total_weight for k, v in zip(names, totals.tolist())}


@torch.no_grad()
def sampled_kl(policy, reference, task, tok, n_prompts=500, max_new_tokens=8, seed=0, draws=1):
    """Monte-Carlo estimate of KL(policy || reference) on held-out prompts, in nats per completion:
    sample y ~ policy(.|x) at temperature 1, then average log policy(y|x) - log reference(y|x) over the
    samples (the log-probs are summed over the sampled tokens, EOS included when it was sampled).
    Also the samples' exact-match accuracy, and their mean graded reward when the task has one (what a judge
    ranks by): the reward the KL is paid for, the two axes of the DPO paper's reward-KL frontier. Plain
    (unwrapped) models on the CPU, the first n_prompts held-out problems, `draws` samples each (more draws, smaller
    standard errors). Returns a dict with kl, kl_stderr, sampled_accuracy, sampled_reward and
    sampled_reward_stderr (standard errors over the samples)."""
    policy.eval()
    reference.eval()
    problems = task.eval_problems[:n_prompts] * draws
    texts = [task.prompt(a, b) for a, b in problems]
    prompts = [tok.encode(t) for t in texts]
    g = torch.Generator().manual_seed(seed)
    outs = policy.generate(prompts, max_new_tokens, tok.eos_id, tok.pad_id, temperature=1.0, generator=g)
    # generate drops the EOS; a completion shorter than max_new_tokens stopped because EOS was sampled
    seqs = [(p, o + [tok.eos_id] if len(o) < max_new_tokens else o) for p, o in zip(prompts, outs)]
    idx, targets, mask = collate(seqs, tok.pad_id)
    log_ratio = (summed_logps(token_logps(policy(idx), targets), mask)[0]
                 - summed_logps(token_logps(reference(idx), targets), mask)[0])  # (n,)
    answers = [tok.decode(o) for o in outs]
    correct = [task.is_correct(t, y) for t, y in zip(texts, answers)]
    rewards = torch.tensor([task.reward(t, y) for t, y in zip(texts, answers)], dtype=torch.float64)
    n = len(seqs)
    return {"kl": log_ratio.mean().item(), "kl_stderr": (log_ratio.std() / n ** 0.5).item(),
            "sampled_accuracy": sum(correct) / n, "sampled_reward": rewards.mean().item(),
            "sampled_reward_stderr": (rewards.std() / n ** 0.5).item()}
