"""The preference-loss family of trainer/loss.py against two independent sources.

(a) TRL 1.16 (test-only dependency, imported here and nowhere else): for every loss TRL implements,
TRL's own trainer (`DPOTrainer`, `KTOTrainer`, and the experimental `CPOTrainer` for SimPO and
`ORPOTrainer`) computes the first-batch loss of the same toy policy, reference model and batch, and
the project's loss from its own tokenisation, collation and log-probs must equal it to 1e-5. The
policy is the reference after three Adam steps, so the log-ratios are far from 0.
(b) For every loss, an implementation written here in Python floats from the paper's formula, and
hand-derived values at h = 0 (policy == reference), where most losses are constants.
(c) Gradients exist, are finite where the formulas are, and match finite differences.
"""

import copy
import inspect
import math
import re

import pytest
import torch

from trainer.collate import collate, tokenize_completions
from trainer.logps import sequence_logps
from trainer.loss import (
    LENGTH_LOSS_TYPES,
    LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
    bco_running_delta,
    dpo_loss,
    kto_kl_baseline,
    kto_loss,
    weighted_loss,
)

LN2 = math.log(2.0)

# (a, b, offset): prompt "a+b=", chosen the sum, rejected the sum + offset. Answers of 1 to 4
# characters (+ EOS), so per-token means differ from sums.
ROWS = [(1, 2, 5), (13, 29, -9), (400, 123, 100), (7, 7, 1), (55, 66, -60), (999, 1, 3),
        (3, 48, -1), (250, 250, 1234)]
PROMPTS = [f"{a}+{b}=" for a, b, _ in ROWS]
CHOSEN = [str(a + b) for a, b, _ in ROWS]
REJECTED = [str(a + b + d) for a, b, d in ROWS]


# ---------------------------------------------------------------------------------------------
# The toy world: reference = the toy model, policy = three Adam steps away from it.
# ---------------------------------------------------------------------------------------------


def _project_logps(model, tok, prompts, completions):
    """The project's path: its tokenisation (EOS appended), collation and summed log-probs."""
    prompt_ids, completion_ids = tokenize_completions(tok, prompts, completions)
    t = collate(prompt_ids, completion_ids, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
    return sequence_logps(logits, t["labels"]), t["completion_lengths"]


@pytest.fixture(scope="module")
def toy(toy_model_dir):
    """(tokenizer, reference, policy). The policy took three Adam steps on the NLL of the chosen
    answer in even rows and the rejected one in odd rows, so h has both signs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    policy = copy.deepcopy(reference)
    torch.manual_seed(0)
    targets = [CHOSEN[i] if i % 2 == 0 else REJECTED[i] for i in range(len(ROWS))]
    prompt_ids, completion_ids = tokenize_completions(tok, PROMPTS, targets)
    t = collate(prompt_ids, completion_ids, tok.pad_token_id)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(3):
        logits = policy(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits
        loss = -sequence_logps(logits, t["labels"]).sum() / t["completion_lengths"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    for p in policy.parameters():
        p.requires_grad_(False)
    return tok, reference, policy


@pytest.fixture(scope="module")
def batch(toy):
    """The project's log-probs of the batch: policy / reference x chosen / rejected, lengths."""
    tok, reference, policy = toy
    pc, chosen_lengths = _project_logps(policy, tok, PROMPTS, CHOSEN)
    pr, rejected_lengths = _project_logps(policy, tok, PROMPTS, REJECTED)
    rc, _ = _project_logps(reference, tok, PROMPTS, CHOSEN)
    rr, _ = _project_logps(reference, tok, PROMPTS, REJECTED)
    return dict(logps=(pc, pr, rc, rr), chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths)


def test_policy_differs_from_reference(batch):
    """Otherwise every comparison below would be of constants."""
    pc, pr, rc, rr = batch["logps"]
    h = (pc - rc) - (pr - rr)
    assert h.abs().max() > 3 and (h > 0.5).any() and (h < -0.5).any(), h


# ---------------------------------------------------------------------------------------------
# (a) TRL 1.16's trainers on the same policy, reference and batch
# ---------------------------------------------------------------------------------------------

# TRL's loss_type -> the project's, and the settings both take (same names on both sides).
# TRL's `ipo` averages log-ratios per token: the project's `ipo_mean`.
TRL_DPO_CASES = [
    ("sigmoid", "sigmoid", {}),
    ("hinge", "hinge", {}),
    ("ipo", "ipo_mean", {}),
    ("exo_pair", "exo_pair", {"label_smoothing": 1e-3}),
    ("nca_pair", "nca_pair", {}),
    ("robust", "robust", {"label_smoothing": 0.2}),
    ("bco_pair", "bco_pair", {}),
    ("sppo_hard", "sppo_hard", {}),
    ("aot", "aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", "aot_unpaired", {"label_smoothing": 0.1}),
    ("apo_zero", "apo_zero", {}),
    ("apo_down", "apo_down", {}),
    ("discopop", "discopop", {}),  # both defaults: τ = 0.05
    ("sft", "sft", {}),
    ("sigmoid_norm", "sigmoid_norm", {}),
]
BETAS = (0.1, 1.0)


def _trl_args(config_cls, tmp_path, **kwargs):
    # bf16 off: TRL turns it on by default, and CPU autocast would round the log-probs.
    return config_cls(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                      disable_tqdm=True, seed=0, **kwargs)


def _trl_pairs():
    """The batch as a TRL preference dataset (TRL appends the EOS, as the project does)."""
    from datasets import Dataset

    return Dataset.from_list([dict(prompt=p, chosen=c, rejected=r)
                              for p, c, r in zip(PROMPTS, CHOSEN, REJECTED, strict=True)])


def _trl_dpo_trainer(toy, tmp_path, **config):
    """TRL's DPOTrainer on the 8 pairs, one batch of all of them, with a live reference model
    (copies: TRL patches the models' forward)."""
    from trl import DPOConfig, DPOTrainer

    tok, reference, policy = toy
    args = _trl_args(DPOConfig, tmp_path, per_device_train_batch_size=len(ROWS), max_length=None,
                     **config)
    return DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                      train_dataset=_trl_pairs(), processing_class=tok)


def _first_batch_loss(trainer) -> tuple[float, dict]:
    """The loss TRL trains on at step 0, and the metrics it logs for it."""
    inputs = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    return float(loss.detach()), {k: v[-1] for k, v in trainer._metrics["train"].items()}


def test_trl_is_the_pinned_version():
    """The comparisons are with TRL 1.16's definitions, which change between releases."""
    import trl

    assert trl.__version__ == "1.16.0"


def test_every_trl_dpo_loss_is_compared():
    """The loss types TRL's DPOTrainer implements, read from its source, are exactly the cases
    below: a loss added to TRL fails here until it is added to the project and compared."""
    from trl import DPOTrainer

    source = inspect.getsource(DPOTrainer._compute_loss)
    trl_types = set(re.findall(r'loss_type == "(\w+)"', source))
    assert trl_types == {case[0] for case in TRL_DPO_CASES}
    assert {case[1] for case in TRL_DPO_CASES} <= set(LOSS_TYPES)


def test_trl_tokenises_the_batch_as_the_project_does(toy, tmp_path):
    """Same token ids on both sides, so the comparisons below are on the same batch."""
    tok = toy[0]
    trainer = _trl_dpo_trainer(toy, tmp_path)
    prompt_ids, chosen_ids = tokenize_completions(tok, PROMPTS, CHOSEN)
    _, rejected_ids = tokenize_completions(tok, PROMPTS, REJECTED)
    data = trainer.train_dataset
    assert data["prompt_ids"] == prompt_ids
    assert data["chosen_ids"] == chosen_ids
    assert data["rejected_ids"] == rejected_ids


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("trl_type, loss_type, settings", TRL_DPO_CASES,
                         ids=[case[0] for case in TRL_DPO_CASES])
def test_first_batch_loss_equals_trl_dpo_trainer(toy, batch, tmp_path, trl_type, loss_type,
                                                 settings, beta):
    trl_loss, metrics = _first_batch_loss(
        _trl_dpo_trainer(toy, tmp_path, loss_type=[trl_type], beta=beta, **settings))
    pc, pr, rc, rr = batch["logps"]
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        pc, pr, rc, rr, beta=beta, loss_type=loss_type, chosen_lengths=batch["chosen_lengths"],
        rejected_lengths=batch["rejected_lengths"], **settings)
    assert losses.shape == (len(ROWS),)
    assert float(losses.mean()) == pytest.approx(trl_loss, rel=1e-5, abs=1e-5)
    # The per-sequence log-probs (summed over completion tokens incl. EOS) and rewards agree too.
    assert float(pc.mean()) == pytest.approx(metrics["logps/chosen"], rel=1e-5, abs=1e-5)
    assert float(pr.mean()) == pytest.approx(metrics["logps/rejected"], rel=1e-5, abs=1e-5)
    assert float(chosen_rewards.mean()) == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert float(rejected_rewards.mean()) == pytest.approx(metrics["rewards/rejected"], abs=1e-5)


def test_weighted_list_equals_trl_mpo(toy, batch, tmp_path):
    """MPO's mix, TRL's documented example: [sigmoid, bco_pair, sft] with [0.8, 0.2, 1.0]."""
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    trl_loss, _ = _first_batch_loss(
        _trl_dpo_trainer(toy, tmp_path, loss_type=types, loss_weights=weights, beta=0.5))
    losses, _, _ = weighted_loss(*batch["logps"], beta=0.5, loss_types=types,
                                 loss_weights=weights, chosen_lengths=batch["chosen_lengths"],
                                 rejected_lengths=batch["rejected_lengths"])
    assert float(losses.mean()) == pytest.approx(trl_loss, rel=1e-5, abs=1e-5)


def test_kto_first_batch_equals_trl_kto_trainer(toy, tmp_path):
    """KTOTrainer on the pairs unpaired (chosen desirable, rejected undesirable), one batch of
    16. TRL's reference point comes from each row's prompt with the previous row's completion
    (its documented rotation within a batch); the project gets the same mismatched pairs' log-probs
    from its own functions and passes them to `kto_kl_baseline`."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    tok, reference, policy = toy
    prompts = [p for p in PROMPTS for _ in (0, 1)]
    completions = [x for pair in zip(CHOSEN, REJECTED, strict=True) for x in pair]
    desirable = torch.tensor([True, False] * len(ROWS))
    rows = [dict(prompt=p, completion=c, label=bool(d))
            for p, c, d in zip(prompts, completions, desirable, strict=True)]
    beta, weights = 0.5, dict(desirable_weight=1.0, undesirable_weight=1.25)
    args = _trl_args(KTOConfig, tmp_path, per_device_train_batch_size=len(rows), max_length=None,
                     beta=beta, **weights)
    trainer = KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
                         args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trl_loss, metrics = _first_batch_loss(trainer)

    kl_completions = completions[-1:] + completions[:-1]
    _, kl_ids = tokenize_completions(tok, prompts, kl_completions)
    assert trainer.train_dataset["KL_completion_ids"] == kl_ids  # the same mismatched pairs

    policy_logps, _ = _project_logps(policy, tok, prompts, completions)
    reference_logps, _ = _project_logps(reference, tok, prompts, completions)
    kl = kto_kl_baseline(_project_logps(policy, tok, prompts, kl_completions)[0],
                         _project_logps(reference, tok, prompts, kl_completions)[0])
    assert kl > 0.5  # not the clamp at 0: the reference point is exercised
    assert float(kl) == pytest.approx(metrics["kl"], rel=1e-5, abs=1e-5)
    losses, rewards = kto_loss(policy_logps, reference_logps, desirable, kl, beta=beta, **weights)
    assert float(losses.mean()) == pytest.approx(trl_loss, rel=1e-5, abs=1e-5)
    assert float(rewards[desirable].mean()) == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert float(rewards[~desirable].mean()) == pytest.approx(metrics["rewards/rejected"],
                                                              abs=1e-5)


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0])
def test_simpo_first_batch_equals_trl_cpo_trainer(toy, batch, tmp_path, cpo_alpha):
    """TRL has SimPO in its experimental CPOTrainer (`loss_type="simpo"`). With `cpo_alpha` 0 it
    is the paper's SimPO; with 1 (CPOConfig's default) it adds CPO's NLL over the chosen
    completion tokens, which is the project's [simpo, sft]."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tok, _, policy = toy
    beta, gamma = 2.0, 0.5
    args = _trl_args(CPOConfig, tmp_path, per_device_train_batch_size=len(ROWS), max_length=512,
                     loss_type="simpo", beta=beta, simpo_gamma=gamma, cpo_alpha=cpo_alpha)
    trainer = CPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=_trl_pairs(),
                         processing_class=tok)
    inputs = next(iter(trainer.get_train_dataloader()))
    trl_loss, metrics = trainer.compute_loss(trainer.model, inputs, return_outputs=True)

    pc, pr, _, _ = batch["logps"]
    losses, chosen_rewards, _ = weighted_loss(
        pc, pr, None, None, beta=beta, loss_types=["simpo", "sft"],
        loss_weights=[1.0, cpo_alpha], simpo_gamma=gamma, chosen_lengths=batch["chosen_lengths"],
        rejected_lengths=batch["rejected_lengths"])
    assert float(losses.mean()) == pytest.approx(float(trl_loss.detach()), rel=1e-5, abs=1e-5)
    assert float(chosen_rewards.mean()) == pytest.approx(metrics["rewards/chosen"], abs=1e-5)


def test_orpo_first_batch_matches_trl_orpo_trainer(toy, batch, tmp_path):
    """TRL's experimental ORPOTrainer: loss = NLL − β·mean(log σ(log odds-ratio)). Its NLL counts
    the prompt's tokens too (its code says so), the project's only the response's, so the NLL
    terms are compared apart: the odds-ratio term (TRL's loss minus its logged NLL) and the
    length-normalised rewards must agree."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok, _, policy = toy
    beta = 0.5
    args = _trl_args(ORPOConfig, tmp_path, per_device_train_batch_size=len(ROWS), max_length=512,
                     beta=beta)
    trainer = ORPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=_trl_pairs(),
                          processing_class=tok)
    inputs = next(iter(trainer.get_train_dataloader()))
    trl_loss, metrics = trainer.compute_loss(trainer.model, inputs, return_outputs=True)

    pc, pr, _, _ = batch["logps"]
    lengths = dict(chosen_lengths=batch["chosen_lengths"],
                   rejected_lengths=batch["rejected_lengths"])
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, None, None, beta=beta,
                                                        loss_type="orpo", **lengths)
    nll, _, _ = dpo_loss(pc, pr, None, None, beta=beta, loss_type="nll", **lengths)
    trl_odds_ratio_term = float(trl_loss.detach()) - float(metrics["nll_loss"])
    assert float((losses - nll).mean()) == pytest.approx(trl_odds_ratio_term, rel=1e-5, abs=1e-5)
    assert float(chosen_rewards.mean()) == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert float(rejected_rewards.mean()) == pytest.approx(metrics["rewards/rejected"], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# (b) Independent implementations from the papers, in Python floats, and values at h = 0
# ---------------------------------------------------------------------------------------------


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return math.exp(_log_sigmoid(x))


def _paper_losses(loss_type, pc, pr, rc, rr, lc, lr, *, beta, eps=0.0, gamma=0.5, delta=0.0,
                  tau=0.05) -> list[float]:
    """Each loss as its paper writes it, element by element (lists of floats in and out)."""
    n = len(pc)
    cl = [pc[i] - rc[i] for i in range(n)]  # log π/π_ref of the chosen response
    rl = [pr[i] - rr[i] for i in range(n)]
    h = [cl[i] - rl[i] for i in range(n)]

    def dpo(z):  # DPO eq. 7, with cDPO's flipped-label weight ε
        return -(1 - eps) * _log_sigmoid(beta * z) - eps * _log_sigmoid(-beta * z)

    if loss_type == "sigmoid":
        return [dpo(z) for z in h]
    if loss_type == "ipo":  # IPO eq. 17 on the sequences' log-likelihood ratios
        return [(z - 1 / (2 * beta)) ** 2 for z in h]
    if loss_type == "ipo_mean":
        return [(cl[i] / lc[i] - rl[i] / lr[i] - 1 / (2 * beta)) ** 2 for i in range(n)]
    if loss_type == "hinge":
        return [max(0.0, 1 - beta * z) for z in h]
    if loss_type == "robust":  # rDPO: ((1-ε) ℓ(βh) − ε ℓ(−βh)) / (1 − 2ε), ℓ = −log σ
        return [((1 - eps) * -_log_sigmoid(beta * z) - eps * -_log_sigmoid(-beta * z))
                / (1 - 2 * eps) for z in h]
    if loss_type == "bco_pair":
        return [-_log_sigmoid(beta * cl[i] - delta) - _log_sigmoid(-(beta * rl[i] - delta))
                for i in range(n)]
    if loss_type == "sppo_hard":  # (log π/π_t − η(P − ½))², P = 1 and 0, η = 1/β
        eta = 1 / beta
        return [(cl[i] - eta * (1 - 0.5)) ** 2 + (rl[i] - eta * (0 - 0.5)) ** 2 for i in range(n)]
    if loss_type == "nca_pair":
        return [-_log_sigmoid(beta * cl[i])
                - 0.5 * (_log_sigmoid(-beta * cl[i]) + _log_sigmoid(-beta * rl[i]))
                for i in range(n)]
    if loss_type == "apo_zero":
        return [(1 - _sigmoid(beta * cl[i])) + _sigmoid(beta * rl[i]) for i in range(n)]
    if loss_type == "apo_down":
        return [_sigmoid(beta * cl[i]) + (1 - _sigmoid(beta * (cl[i] - rl[i])))
                for i in range(n)]
    if loss_type == "exo_pair":  # KL between (p_w, p_l) = softmax(β·log-ratios) and (1−ε, ε)
        out = []
        for i in range(n):
            pw = 1 / (1 + math.exp(beta * rl[i] - beta * cl[i]))  # softmax over (β cl, β rl)
            pl = 1 / (1 + math.exp(beta * cl[i] - beta * rl[i]))
            # p log(p/q) -> 0 as p -> 0: a probability that underflows adds nothing
            out.append(sum(p * math.log(p / q) for p, q in ((pw, 1 - eps), (pl, eps)) if p))
        return out
    if loss_type == "aot":
        ours = sorted(pc[i] - pr[i] for i in range(n))
        ref = sorted(rc[i] - rr[i] for i in range(n))
        return [dpo(ours[i] - ref[i]) for i in range(n)]
    if loss_type == "aot_unpaired":
        cs, rs = sorted(cl), sorted(rl)
        return [dpo(cs[i] - rs[i]) for i in range(n)]
    if loss_type == "discopop":
        out = []
        for z in h:
            rho = beta * z
            m = _sigmoid(rho / tau)
            out.append((1 - m) * -_log_sigmoid(rho) + m * math.exp(-rho))
        return out
    if loss_type == "sigmoid_norm":
        return [-_log_sigmoid(beta * (cl[i] / lc[i] - rl[i] / lr[i])) for i in range(n)]
    if loss_type == "simpo":  # −log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ), ε as CPO
        zs = [beta * pc[i] / lc[i] - beta * pr[i] / lr[i] - gamma for i in range(n)]
        return [-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z) for z in zs]
    if loss_type == "orpo":  # L_SFT + λ·L_OR with P = exp(mean log-prob), odds = P / (1 − P)
        out = []
        for i in range(n):
            p_w, p_l = math.exp(pc[i] / lc[i]), math.exp(pr[i] / lr[i])
            log_odds_ratio = math.log((p_w / (1 - p_w)) / (p_l / (1 - p_l)))
            out.append(-pc[i] / lc[i] - beta * _log_sigmoid(log_odds_ratio))
        return out
    if loss_type == "sft":
        return [-sum(pc) / sum(lc)] * n
    if loss_type == "nll":
        return [-pc[i] / lc[i] for i in range(n)]
    raise AssertionError(loss_type)


def _random_inputs(seed, n=48, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logps = [-(torch.rand(n, generator=g, dtype=dtype) * 40 + 0.05) for _ in range(4)]
    lengths = [torch.randint(1, 30, (n,), generator=g) for _ in range(2)]
    return logps, lengths


def _settings(loss_type):
    """Non-default settings where a loss has them, so they are exercised."""
    return {"sigmoid": dict(label_smoothing=0.2), "robust": dict(label_smoothing=0.3),
            "exo_pair": dict(label_smoothing=1e-3), "aot": dict(label_smoothing=0.1),
            "aot_unpaired": dict(label_smoothing=0.1), "simpo": dict(simpo_gamma=1.3),
            "bco_pair": dict(bco_delta=0.4), "discopop": dict(discopop_tau=0.2)}.get(loss_type, {})


def _paper_kwargs(settings):
    names = dict(label_smoothing="eps", simpo_gamma="gamma", bco_delta="delta",
                 discopop_tau="tau")
    return {names[k]: v for k, v in settings.items()}


@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_the_papers_formulas(loss_type, beta):
    (pc, pr, rc, rr), (lc, lr) = _random_inputs(seed=11)
    settings = _settings(loss_type)
    if loss_type == "discopop":
        # exp(−ρ) in the formula as written overflows a float for ρ < −709; keep ρ moderate.
        pc, pr, rc, rr = (x / 10 for x in (pc, pr, rc, rr))
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, chosen_lengths=lc,
                            rejected_lengths=lr, **settings)
    expected = _paper_losses(loss_type, *(x.tolist() for x in (pc, pr, rc, rr, lc, lr)),
                             beta=beta, **_paper_kwargs(settings))
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("loss_type", REFERENCE_FREE_LOSS_TYPES)
def test_reference_free_losses_ignore_the_reference(loss_type):
    (pc, pr, rc, rr), (lc, lr) = _random_inputs(seed=5)
    kw = dict(beta=0.5, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr)
    without, cw, rw = dpo_loss(pc, pr, None, None, **kw)
    with_reference, _, _ = dpo_loss(pc, pr, rc, rr, **kw)
    torch.testing.assert_close(without, with_reference)
    # The length-normalised reward of SimPO's eq. 4 (what TRL's CPO/ORPO trainers log).
    torch.testing.assert_close(cw, 0.5 * pc / lc)
    torch.testing.assert_close(rw, 0.5 * pr / lr)


def _at_h_zero(loss_type, beta, eps):
    """Hand-derived values with policy == reference (all log-ratios 0)."""
    if loss_type == "exo_pair":  # ½ ln(½/(1−ε)) + ½ ln(½/ε)
        return -LN2 - 0.5 * math.log(eps * (1 - eps))
    return {
        "sigmoid": LN2,  # −(1−ε) log ½ − ε log ½
        "ipo": 1 / (4 * beta ** 2),  # (0 − 1/(2β))²
        "ipo_mean": 1 / (4 * beta ** 2),
        "hinge": 1.0,
        "robust": LN2,  # ((1−ε) − ε) ln 2 / (1 − 2ε)
        "bco_pair": 2 * LN2,
        "sppo_hard": 2 * (1 / (2 * beta)) ** 2,
        "nca_pair": 2 * LN2,  # ln 2 + ½ ln 2 + ½ ln 2
        "apo_zero": 1.0,  # (1 − ½) + ½
        "apo_down": 1.0,  # ½ + (1 − ½)
        "aot": LN2,  # sorted equal margins: all differences 0
        "aot_unpaired": LN2,
        "discopop": (LN2 + 1) / 2,  # m = ½: ½ ln 2 + ½ e⁰
        "sigmoid_norm": LN2,
    }[loss_type]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in REFERENCE_FREE_LOSS_TYPES])
def test_closed_form_at_h_zero(loss_type, beta):
    (pc, pr, _, _), (lc, lr) = _random_inputs(seed=3, dtype=torch.float32)
    eps = _settings(loss_type).get("label_smoothing", 0.0)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        pc, pr, pc.clone(), pr.clone(), beta=beta, loss_type=loss_type, chosen_lengths=lc,
        rejected_lengths=lr, label_smoothing=eps)
    expected = torch.full_like(losses, _at_h_zero(loss_type, beta, eps))
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-6)
    assert torch.all(chosen_rewards == 0) and torch.all(rejected_rewards == 0)


def test_reference_free_closed_forms():
    """Equal per-token means for chosen and rejected: SimPO is −log σ(−γ) = ln(1 + e^γ); ORPO's
    odds ratio is 1, so it is −mean log-prob + β ln 2; with mean log-prob ln ½, (1 + β) ln 2."""
    lengths = torch.tensor([1, 2, 5, 9])
    logps = lengths * math.log(0.5)
    kw = dict(chosen_lengths=lengths, rejected_lengths=lengths)
    simpo, _, _ = dpo_loss(logps, logps, None, None, beta=2.0, loss_type="simpo",
                           simpo_gamma=0.7, **kw)
    torch.testing.assert_close(simpo, torch.full((4,), math.log1p(math.exp(0.7))))
    orpo, _, _ = dpo_loss(logps, logps, None, None, beta=0.25, loss_type="orpo", **kw)
    torch.testing.assert_close(orpo, torch.full((4,), 1.25 * LN2))
    # sft: token mean over the batch = ln 2 here; nll: per response = ln 2 too.
    sft, _, _ = dpo_loss(logps, logps, None, None, beta=1.0, loss_type="sft", **kw)
    torch.testing.assert_close(sft, torch.full((4,), LN2))


def test_sft_is_a_batch_token_mean_and_nll_a_mean_of_means():
    """TRL's `sft` weighs responses by length; Iterative RPO's `nll` weighs them equally."""
    pc, lc = torch.tensor([-2.0, -30.0]), torch.tensor([1, 10])
    kw = dict(beta=0.1, chosen_lengths=lc, rejected_lengths=lc)
    sft, _, _ = dpo_loss(pc, pc, None, None, loss_type="sft", **kw)
    nll, _, _ = dpo_loss(pc, pc, None, None, loss_type="nll", **kw)
    torch.testing.assert_close(sft, torch.tensor([32 / 11, 32 / 11]))
    torch.testing.assert_close(nll, torch.tensor([2.0, 3.0]))


def test_ipo_summed_and_per_token_differ_by_length():
    """Same pair, three tokens each: the paper's ipo sees h = 3, TRL's ipo_mean h/3 = 1."""
    one, three = torch.tensor([-1.0]), torch.tensor([3])
    kw = dict(beta=0.25, chosen_lengths=three, rejected_lengths=three)
    ipo, _, _ = dpo_loss(one * 0, one * 3, one * 0, one * 0, loss_type="ipo", **kw)
    ipo_mean, _, _ = dpo_loss(one * 0, one * 3, one * 0, one * 0, loss_type="ipo_mean", **kw)
    torch.testing.assert_close(ipo, torch.tensor([(3 - 2) ** 2.0]))
    torch.testing.assert_close(ipo_mean, torch.tensor([(1 - 2) ** 2.0]))


def _paper_kto(pl, rl, desirable, z0, beta, wd, wu):
    """KTO: λ_y − v(x, y), v = λ_D σ(β(r − z₀)) or λ_U σ(β(z₀ − r)), r = log π/π_ref."""
    out = []
    for p, r, d in zip(pl, rl, desirable, strict=True):
        ratio = p - r
        out.append(wd - wd * _sigmoid(beta * (ratio - z0)) if d
                   else wu - wu * _sigmoid(beta * (z0 - ratio)))
    return out


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_kto_matches_the_paper(beta):
    (pl, rl, kl_p, kl_r), _ = _random_inputs(seed=8)
    kl_p = kl_r + torch.linspace(-1, 3, len(kl_r), dtype=torch.float64)  # mean log-ratio 1
    desirable = torch.arange(len(pl)) % 3 == 0
    z0 = kto_kl_baseline(kl_p, kl_r)
    assert float(z0) == pytest.approx(1.0)
    losses, rewards = kto_loss(pl, rl, desirable, z0, beta=beta, desirable_weight=1.3,
                               undesirable_weight=0.7)
    expected = _paper_kto(pl.tolist(), rl.tolist(), desirable.tolist(), 1.0, beta, 1.3, 0.7)
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(rewards, beta * (pl - rl))


def test_kto_closed_form_and_baseline_clamp():
    """π == ref and z₀ = 0: every loss is λ/2. A negative mean log-ratio is clamped to z₀ = 0."""
    logps = -torch.rand(6) * 20
    z0 = kto_kl_baseline(logps - 1.0, logps)
    assert float(z0) == 0.0
    desirable = torch.tensor([True, False, True, False, False, True])
    losses, _ = kto_loss(logps, logps, desirable, z0, beta=0.3, desirable_weight=2.0,
                         undesirable_weight=0.5)
    torch.testing.assert_close(losses, torch.where(desirable, 1.0, 0.25))


def test_kto_baseline_carries_no_gradient():
    p = torch.tensor([-1.0, -2.0], requires_grad=True)
    assert not kto_kl_baseline(p, torch.tensor([-3.0, -3.0])).requires_grad


def test_bco_running_delta_is_the_mean_of_batch_means():
    delta, n = bco_running_delta(0.0, 0, torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0]))
    assert (delta, n) == (3.0, 1)
    delta, n = bco_running_delta(delta, n, torch.tensor([0.0]), torch.tensor([-1.0]))
    assert (delta, n) == (pytest.approx((3.0 - 0.5) / 2), 2)


def test_weighted_loss_sums_the_papers_losses():
    (pc, pr, rc, rr), (lc, lr) = _random_inputs(seed=21)
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    losses, chosen_rewards, _ = weighted_loss(pc, pr, rc, rr, beta=0.3, loss_types=types,
                                              loss_weights=weights, chosen_lengths=lc,
                                              rejected_lengths=lr)
    lists = [x.tolist() for x in (pc, pr, rc, rr, lc, lr)]
    parts = [_paper_losses(t, *lists, beta=0.3) for t in types]
    expected = [sum(w * part[i] for w, part in zip(weights, parts, strict=True))
                for i in range(len(pc))]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(chosen_rewards, 0.3 * (pc - rc))


def test_weighted_loss_subsumes_alpha_nll():
    """[sigmoid, nll] with [1, alpha] is today's DPO + alpha·NLL (Iterative RPO)."""
    (pc, pr, rc, rr), (lc, lr) = _random_inputs(seed=4)
    alpha = 0.7
    losses, _, _ = weighted_loss(pc, pr, rc, rr, beta=0.1, loss_types=["sigmoid", "nll"],
                                 loss_weights=[1.0, alpha], chosen_lengths=lc,
                                 rejected_lengths=lr)
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(0.1 * h) - alpha * pc / lc)
    default, _, _ = weighted_loss(pc, pr, rc, rr, beta=0.1, loss_types=["sigmoid", "nll"],
                                  chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(default, -torch.nn.functional.logsigmoid(0.1 * h) - pc / lc)


# ---------------------------------------------------------------------------------------------
# (c) Gradients
# ---------------------------------------------------------------------------------------------


def _loss_fn(loss_type, rc, rr, lc, lr, beta=0.5):
    settings = _settings(loss_type)

    def f(pc, pr):
        losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                chosen_lengths=lc, rejected_lengths=lr, **settings)
        return losses

    return f


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_match_finite_differences(loss_type):
    (pc, pr, rc, rr), (lc, lr) = _random_inputs(seed=13, n=6)
    pc, pr = (x.detach().requires_grad_() for x in (pc, pr))
    f = _loss_fn(loss_type, rc, rr, lc, lr)
    assert torch.autograd.gradcheck(f, (pc, pr))
    f(pc, pr).sum().backward()
    assert (pc.grad != 0).any()  # the policy's chosen log-prob is trained by every loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_are_finite_at_extreme_margins(loss_type, dtype):
    """Log-ratios of ±300 nats (policy far from reference either way) and one-token responses:
    the loss and its gradient stay finite in float32 and float64 (the squared losses grow, they
    do not overflow; saturated sigmoids give zero gradients, not NaN)."""
    pc = torch.tensor([-1.0, -400.0, -0.5, -350.0], dtype=dtype)
    pr = torch.tensor([-400.0, -1.0, -300.0, -0.7], dtype=dtype)
    rc = torch.tensor([-300.0, -100.0, -200.0, -50.0], dtype=dtype)
    rr = torch.tensor([-100.0, -300.0, -10.0, -320.0], dtype=dtype)
    lc = lr = torch.tensor([1, 1, 40, 2])
    pc, pr = pc.requires_grad_(), pr.requires_grad_()
    losses = _loss_fn(loss_type, rc, rr, lc, lr, beta=1.0)(pc, pr)
    losses.sum().backward()
    assert torch.isfinite(losses).all(), losses
    assert pc.grad is not None and torch.isfinite(pc.grad).all(), pc.grad
    assert pr.grad is None or torch.isfinite(pr.grad).all(), pr.grad  # sft, nll: chosen only


def test_kto_gradient_flows_through_the_policy_only():
    p = torch.tensor([-3.0, -4.0, -5.0], requires_grad=True)
    kl_p = torch.tensor([-2.0, -2.5], requires_grad=True)
    z0 = kto_kl_baseline(kl_p, torch.tensor([-3.0, -3.0]))
    losses, _ = kto_loss(p, torch.tensor([-3.5, -3.5, -3.5]), torch.tensor([True, False, True]),
                         z0, beta=0.5)
    losses.sum().backward()
    assert torch.isfinite(p.grad).all() and (p.grad != 0).all()
    assert kl_p.grad is None


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def _four():
    return [torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -3.0]), torch.tensor([-1.5, -2.0]),
            torch.tensor([-2.0, -2.5])]


def test_loss_types_keep_the_old_names_and_add_trls():
    assert {"sigmoid", "ipo", "hinge"} <= set(LOSS_TYPES)
    assert "kto" not in LOSS_TYPES  # unpaired: `kto_loss`
    assert len(set(LOSS_TYPES)) == len(LOSS_TYPES)


@pytest.mark.parametrize("loss_type", LENGTH_LOSS_TYPES)
def test_length_normalised_losses_need_lengths(loss_type):
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(*_four(), beta=0.1, loss_type=loss_type)


@pytest.mark.parametrize("loss_type",
                         [t for t in LOSS_TYPES if t not in REFERENCE_FREE_LOSS_TYPES])
def test_reference_based_losses_need_the_reference(loss_type):
    pc, pr, _, _ = _four()
    lengths = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(pc, pr, None, None, beta=0.1, loss_type=loss_type, label_smoothing=1e-3 if
                 loss_type == "exo_pair" else 0.0, chosen_lengths=lengths,
                 rejected_lengths=lengths)


def test_exo_needs_label_smoothing():
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(*_four(), beta=0.1, loss_type="exo_pair")


@pytest.mark.parametrize("loss_type", ["ipo_mean", "bco_pair", "sppo_hard", "nca_pair", "apo_zero",
                                       "apo_down", "discopop", "sigmoid_norm", "orpo"])
def test_label_smoothing_is_refused_where_unused(loss_type):
    lengths = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*_four(), beta=0.1, loss_type=loss_type, label_smoothing=0.1,
                 chosen_lengths=lengths, rejected_lengths=lengths)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_types="sigmoid"), "list"), (dict(loss_types=[]), "list"),
    (dict(loss_types=["sigmoid", "hinge"], loss_weights=[1.0]), "loss_weights"),
    (dict(loss_types=["sigmoid", "kto"]), "loss_type"),
])
def test_weighted_loss_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        weighted_loss(*_four(), beta=0.1, **kwargs)


def test_kto_bad_arguments():
    with pytest.raises(ValueError, match="bool"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1, 0]), 0.0, beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), 0.0, beta=0.0)



# ---------------------------------------------------------------- (d) the trainer's step


@pytest.mark.parametrize("layout", ["padded", "auto"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_trainer_step_feeds_every_loss_its_lengths(toy_model_dir, toy_tokenizer, loss_type,
                                                    layout):
    """`odpo train`'s micro-batch loss (trainer.loop.dpo_step_loss) for every loss type equals
    `dpo_loss` on log-probs from a plain forward and completion lengths counted here by hand
    (answer characters + EOS), with reference log-probs that differ from the policy's; in the
    padded layout and in `auto` (the toy's sdpa attention: shared_prompt)."""
    from conftest import char_ids, plain_logp
    from transformers import AutoModelForCausalLM

    from trainer.loop import dpo_step_loss

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32).eval()
    eos = toy_tokenizer.eos_token_id
    prompts = [char_ids(toy_tokenizer, p) for p in PROMPTS[:4]]
    chosen = [char_ids(toy_tokenizer, str(a + b)) + [eos] for a, b, _ in ROWS[:4]]
    rejected = [char_ids(toy_tokenizer, str(a + b + o)) + [eos] for a, b, o in ROWS[:4]]
    pol_c = [plain_logp(model, p, c) for p, c in zip(prompts, chosen, strict=True)]
    pol_r = [plain_logp(model, p, r) for p, r in zip(prompts, rejected, strict=True)]
    ref_c = [x + 0.3 * (i + 1) for i, x in enumerate(pol_c)]  # h differs pair to pair
    ref_r = [x - 0.2 * (i + 1) for i, x in enumerate(pol_r)]
    batch = {"prompt_input_ids": prompts, "chosen_input_ids": chosen,
             "rejected_input_ids": rejected, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    eps = 0.1 if loss_type == "exo_pair" else 0.0
    cfg = {"beta": 0.1, "loss_type": loss_type, "label_smoothing": eps, "alpha": 0.0,
           "layout": layout}
    _, metrics = dpo_step_loss(model, batch, toy_tokenizer.pad_token_id, cfg)

    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    want, _, _ = dpo_loss(t(pol_c), t(pol_r), t(ref_c), t(ref_r), beta=0.1, loss_type=loss_type,
                          label_smoothing=eps, chosen_lengths=t([len(c) for c in chosen]),
                          rejected_lengths=t([len(r) for r in rejected]))
    # float32 log-probs of two forwards (the layouts, thread counts) differ by ~1e-6; IPO squares
    # a margin of ~1/β = 10 (loss ~39): that difference times 2·(h - 1/2β)/β, i.e. relative.
    assert metrics["dpo_loss"] == pytest.approx(want.mean().item(), rel=1e-6, abs=1e-5)


# ---------------------------------------------------------------- (e) loss lists in the trainer


def _toy_pair_batch(tok, model, ref_shift=(0.0, 0.0)):
    """Four pairs as `dpo_step_loss` reads them, with reference log-probs from a plain forward
    (+ a shift per side: off the reference when nonzero)."""
    from conftest import char_ids, plain_logp

    eos = tok.eos_token_id
    prompts = [char_ids(tok, p) for p in PROMPTS[:4]]
    chosen = [char_ids(tok, str(a + b)) + [eos] for a, b, _ in ROWS[:4]]
    rejected = [char_ids(tok, str(a + b + o)) + [eos] for a, b, o in ROWS[:4]]
    ref_c = [plain_logp(model, p, c) + ref_shift[0] * (i + 1)
             for i, (p, c) in enumerate(zip(prompts, chosen, strict=True))]
    ref_r = [plain_logp(model, p, r) + ref_shift[1] * (i + 1)
             for i, (p, r) in enumerate(zip(prompts, rejected, strict=True))]
    return {"prompt_input_ids": prompts, "chosen_input_ids": chosen,
            "rejected_input_ids": rejected, "ref_chosen_logps": ref_c,
            "ref_rejected_logps": ref_r}


def _step(model, batch, pad, cfg):
    """One micro-batch's loss, metrics and gradients."""
    from trainer.loop import dpo_step_loss

    model.zero_grad(set_to_none=True)
    loss, metrics = dpo_step_loss(model, batch, pad, cfg)
    loss.backward()
    return float(loss.detach()), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_list_sigmoid_nll_equals_alpha(toy_model_dir, toy_tokenizer):
    """`loss_type: [sigmoid, nll]` with `loss_weights: [1, a]` is today's DPO + a·NLL
    (`alpha: a`): the same loss and the same gradients, to 1e-6, off the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32).eval()
    batch = _toy_pair_batch(toy_tokenizer, model, ref_shift=(0.4, -0.3))
    pad, a = toy_tokenizer.pad_token_id, 0.7
    base = {"beta": 0.1, "label_smoothing": 0.0}
    loss_alpha, m_alpha, g_alpha = _step(model, batch, pad,
                                         {**base, "loss_type": "sigmoid", "alpha": a})
    loss_list, m_list, g_list = _step(model, batch, pad, {
        **base, "loss_type": ["sigmoid", "nll"], "loss_weights": [1.0, a], "alpha": 0.0})
    assert loss_list == pytest.approx(loss_alpha, abs=1e-6)
    for name, g in g_alpha.items():
        torch.testing.assert_close(g_list[name], g, atol=1e-6, rtol=0, msg=name)
    assert m_list["loss/sigmoid"] == pytest.approx(m_alpha["dpo_loss"], abs=1e-6)
    assert m_list["loss/nll"] == pytest.approx(m_alpha["nll_loss"], abs=1e-6)


def test_mpo_list_at_step_zero_is_the_sum_of_its_parts(toy_model_dir, toy_tokenizer):
    """`[sigmoid, bco_pair, sft]` with `[0.8, 0.2, 1.0]` (MPO) at step 0 (policy == reference):
    sigmoid is ln 2, bco_pair 2 ln 2 (both sides σ(0)), sft the token-mean NLL of the chosen
    responses, computed here from a plain forward and lengths counted by hand."""
    from conftest import plain_logp
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32).eval()
    batch = _toy_pair_batch(toy_tokenizer, model)
    cfg = {"beta": 0.1, "label_smoothing": 0.0, "alpha": 0.0,
           "loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}
    loss, metrics, _ = _step(model, batch, toy_tokenizer.pad_token_id, cfg)
    chosen = list(zip(batch["prompt_input_ids"], batch["chosen_input_ids"], strict=True))
    sft = -sum(plain_logp(model, p, c) for p, c in chosen) / sum(len(c) for _, c in chosen)
    assert loss == pytest.approx(0.8 * LN2 + 0.2 * 2 * LN2 + sft, abs=1e-5)
    assert metrics["loss/sigmoid"] == pytest.approx(LN2, abs=1e-6)
    assert metrics["loss/bco_pair"] == pytest.approx(2 * LN2, abs=1e-6)
    assert metrics["loss/sft"] == pytest.approx(sft, abs=1e-5)


def test_weighted_loss_gives_label_smoothing_to_the_losses_that_read_it():
    (pc, pr, rc, rr), (lc, lr) = _random_inputs(seed=9)
    kw = dict(chosen_lengths=lc, rejected_lengths=lr, beta=0.3)
    losses, _, _ = weighted_loss(pc, pr, rc, rr, loss_types=["sigmoid", "bco_pair"],
                                 loss_weights=[1.0, 0.5], label_smoothing=0.2, **kw)
    lists = [x.tolist() for x in (pc, pr, rc, rr, lc, lr)]
    sigmoid = _paper_losses("sigmoid", *lists, beta=0.3, eps=0.2)
    bco = _paper_losses("bco_pair", *lists, beta=0.3)
    torch.testing.assert_close(losses, torch.tensor(
        [s + 0.5 * b for s, b in zip(sigmoid, bco, strict=True)], dtype=torch.float64))
    with pytest.raises(ValueError, match="label_smoothing"):
        weighted_loss(pc, pr, rc, rr, loss_types=["hinge", "bco_pair"], label_smoothing=0.2,
                      **kw)


def test_reference_free_is_every_listed_loss():
    from trainer.dpo import needed_columns
    from trainer.loss import reference_free, unpaired

    assert reference_free("simpo") and reference_free(["simpo", "sft"])
    assert not reference_free(["simpo", "sigmoid"]) and not reference_free("kto")
    assert unpaired("kto") and not unpaired(["sigmoid", "sft"])
    assert "ref_chosen_logps" not in needed_columns(["orpo", "nll"])
    assert "ref_chosen_logps" in needed_columns(["orpo", "sigmoid"])
    assert "ref_kl_logps" in needed_columns("kto")


@pytest.mark.parametrize("fields, match", [
    (dict(loss_type=["sigmoid", "dpo"]), "loss_type must be one of .* got 'dpo'"),
    (dict(loss_type=["sigmoid", "sigmoid"]), "lists a loss twice"),
    (dict(loss_type=[]), "at least one loss"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]),
     "loss_weights has 1 weight.* for the 2 loss"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, -1.0]), "finite and >= 0"),
    (dict(loss_type=["sigmoid", "nll"], alpha=1.0), "alpha is the weight of an nll term"),
    (dict(loss_type=["hinge", "bco_pair"], label_smoothing=0.1),
     "loss_type hinge,bco_pair would ignore it"),
    (dict(loss_type=["bco_pair", "exo_pair"]), "exo_pair needs label_smoothing"),
    (dict(loss_type=["simpo", "sft"], ref_logps="live"), "needs no reference model"),
])
def test_loss_list_config_errors_are_one_line(fields, match):
    from pipeline.errors import UserError
    from trainer.dpo import DPOConfig, check_config

    with pytest.raises(UserError, match=match) as e:
        check_config(DPOConfig(model="m", data="d", out="o", beta=0.1, **fields))
    assert len(str(e.value).splitlines()) == 1


def test_loss_list_config_accepts_what_some_loss_reads():
    from trainer.dpo import DPOConfig, check_config

    check_config(DPOConfig(model="m", data="d", out="o", beta=0.1, label_smoothing=0.1,
                           loss_type=["sigmoid", "bco_pair", "sft"],
                           loss_weights=[0.8, 0.2, 1.0]))
    check_config(DPOConfig(model="m", data="d", out="o", beta=0.1, alpha=1.0,
                           loss_type=["sigmoid", "bco_pair"]))
