"""Training parity with PyTorch: from the same Hugging Face weights and the same batches
(`inspect-data --out`), 20 steps of `bert-jax pretrain` without dropout give the per-step
losses and the final weights of `transformers.BertForPreTraining` trained with
`torch.optim.AdamW` (BERT's decay exclusions, `get_linear_schedule_with_warmup`,
`clip_grad_norm_`), and with LAMB written out from the paper (You et al. 2019, Algorithm 2).
"""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
import transformers
from pretrain_runs import PRETRAIN, one_process_env, overrides

from bert_jax.config import DataConfig
from bert_jax.metrics import read_metrics

STEPS, WARMUP, LEARNING_RATE = 20, 5, 1e-3
BETAS, EPS = (0.9, 0.999), 1e-6
# Large enough that decaying what BERT exempts (LayerNorm, biases) would move those
# parameters past the tolerance below in 20 steps; the default 0.01 would hide it.
WEIGHT_DECAY = 0.1
# Between the gradient norms these runs see: some steps are clipped, some are not.
CLIP = 2.0
VOCAB = 2000
SETTINGS = {"train.adam_b1": BETAS[0], "train.adam_b2": BETAS[1], "train.adam_eps": EPS,
            "train.weight_decay": WEIGHT_DECAY, "train.grad_clip_norm": CLIP,
            "train.num_steps": STEPS, "train.warmup_steps": WARMUP,
            "train.learning_rate": LEARNING_RATE, "train.log_every": 1, "train.eval_steps": 1,
            "checkpoint.every_steps": STEPS, "model.hidden_dropout_rate": 0.0,
            "model.attention_dropout_rate": 0.0}
RTOL = 1e-4
# Float32 rounding in two frameworks leaves weights ~1e-7 apart (an ulp of a LayerNorm scale
# near 1). The absolute floor is for elements near 0, whose relative error means nothing: it
# is a thousandth of the learning rate, which bounds how far Adam moves an element per step,
# so no real difference in an update hides under it.
ATOL = 1e-6


def _init_weights(out, tokenizer_file) -> None:
    """A random BERT-tiny-like `BertForPreTraining` with its tokenizer. Biases and LayerNorm
    parameters are made non-zero (Hugging Face starts them at 0 and 1) so that decaying them,
    and LAMB's trust ratio over them, show in the weights."""
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=512, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not _decays(name):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out)
    shutil.copy(tokenizer_file, out / "tokenizer.model")


def _decays(name: str) -> bool:
    """BERT's weight decay exclusions (Hugging Face's run_mlm, google-research/bert)."""
    return not ("LayerNorm" in name or name.endswith("bias"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, straight_run):
    """The batches of the 20 steps and the workdirs of an AdamW and a LAMB run from one
    initial model: the tokenizer trained on the built-in corpus (the reference run's, of the
    same data settings: trained once per test run, copied here), the dataset built once by
    `inspect-data` and read by both runs. Returns (batches, init dir, {optimizer: workdir})."""
    from bert_jax.data import dataset

    root = tmp_path_factory.mktemp("torch-parity")
    data_dir, init = root / "data", root / "init"
    shutil.copytree(straight_run[1] / "tokenizers", data_dir / "tokenizers")
    _init_weights(init, dataset.tokenizer_file(DataConfig(data_dir=str(data_dir),
                                                          vocab_size=VOCAB)))
    args = overrides(data_dir, **SETTINGS, **{"train.init": init})
    batches_file = root / "batches.npz"
    result = subprocess.run(
        [*PRETRAIN[:-1], "inspect-data", f"--steps={STEPS}", f"--out={batches_file}", *args],
        capture_output=True, text=True, timeout=300, env=one_process_env(1))
    assert result.returncode == 0, result.stderr
    workdirs = {name: root / name for name in ("adamw", "lamb")}
    started = [subprocess.Popen([*PRETRAIN, f"--workdir={workdir}", *args,
                                 f"--config.train.optimizer={name}"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=one_process_env(1))
               for name, workdir in workdirs.items()]
    for process in started:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
    # One dataset: the runs trained on the one inspect-data saved (its name is its identity).
    assert len(list((data_dir / "bert_pretraining").iterdir())) == 1
    return dict(np.load(batches_file)), init, workdirs


def _hf_inputs(batches: dict, step: int) -> dict:
    """A step's batch as `BertForPreTraining` takes it, its own losses included: labels at the
    masked positions (-100 elsewhere) and the NSP labels."""
    batch = {name: torch.from_numpy(values[step]).long() for name, values in batches.items()
             if name != "masked_lm_weights"}
    weights = batches["masked_lm_weights"][step]
    # 0/1 weights: Hugging Face's mean over the labelled positions is bert-jax's weighted mean.
    assert set(np.unique(weights)) <= {0.0, 1.0}
    rows, slots = np.nonzero(weights)
    labels = torch.full(batch["input_ids"].shape, -100)
    positions = batch["masked_lm_positions"][rows, slots]
    assert len(set(zip(rows.tolist(), positions.tolist()))) == len(rows)  # distinct positions
    labels[rows, positions] = batch["masked_lm_ids"][rows, slots]
    return {"input_ids": batch["input_ids"], "token_type_ids": batch["segment_ids"],
            "attention_mask": batch["input_mask"], "labels": labels,
            "next_sentence_label": batch["next_sentence_labels"]}


def _train_torch(init, batches, make_optimizer) -> tuple[list[dict], dict]:
    """20 steps of the model at `init` on `batches`, clipped and scheduled as bert-jax's
    TrainConfig says, with `make_optimizer(named_parameters)`. Returns each step's loss,
    gradient norm (before clipping) and learning rate, and the final weights."""
    model = transformers.BertForPreTraining.from_pretrained(init, attn_implementation="eager")
    optimizer = make_optimizer(dict(model.named_parameters()))
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, WARMUP, STEPS)
    steps = []
    for step in range(STEPS):
        loss = model(**_hf_inputs(batches, step)).loss
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad.double() for p in model.parameters()]
        steps.append({"loss": loss.item(), "learning_rate": optimizer.param_groups[0]["lr"],
                      # in float64: clip_grad_norm_'s float32 norm is ~1e-5 off here
                      "grad_norm": torch.linalg.vector_norm(torch.stack(
                          [torch.linalg.vector_norm(g) for g in grads])).item()})
        # Its clip factor, max_norm / (norm + 1e-6), is optax's max_norm / norm within 1e-6.
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        schedule.step()
    return steps, {k: v.numpy() for k, v in model.state_dict().items()}


def _adamw(params: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [{"params": [p for n, p in params.items() if _decays(n)], "weight_decay": WEIGHT_DECAY},
         {"params": [p for n, p in params.items() if not _decays(n)], "weight_decay": 0.0}],
        lr=LEARNING_RATE, betas=BETAS, eps=EPS)


class Lamb(torch.optim.Optimizer):
    """LAMB as the paper's Algorithm 2 writes it, per tensor: Adam's bias-corrected moments
    give r = m / (sqrt(v) + eps) + decay * p, and the tensor moves by lr * ||p|| / ||r|| * r
    (ratio 1 where a norm is 0). As google-research/bert's and NVIDIA's LAMB, what is not
    decayed (LayerNorm, biases) takes no trust ratio: it moves by lr * r."""

    def __init__(self, params: dict):
        super().__init__([{"params": [p], "adaptive": _decays(n)} for n, p in params.items()],
                         {"lr": LEARNING_RATE})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            [p] = group["params"]
            r = self._direction(p, WEIGHT_DECAY if group["adaptive"] else 0.0)
            p_norm, r_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(r)
            adapt = group["adaptive"] and p_norm > 0 and r_norm > 0
            p.sub_(group["lr"] * (p_norm / r_norm if adapt else 1.0) * r)

    def _direction(self, p, weight_decay):
        state = self.state[p]
        if not state:
            state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
        state["t"] += 1
        (b1, b2), t = BETAS, state["t"]
        state["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
        state["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        m_hat, v_hat = state["m"] / (1 - b1 ** t), state["v"] / (1 - b2 ** t)
        return m_hat / (v_hat.sqrt() + EPS) + weight_decay * p


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_pretraining_matches_pytorch_step_by_step(runs, optimizer):
    batches, init, workdirs = runs
    workdir = workdirs[optimizer]
    saved = json.loads((workdir / "config.json").read_text())["train"]
    assert saved["optimizer"] == optimizer
    for key in ("adam_b1", "adam_b2", "adam_eps", "weight_decay", "grad_clip_norm"):
        assert saved[key] == SETTINGS[f"train.{key}"], key  # not the built-in run's defaults
    theirs, weights = _train_torch(init, batches, _adamw if optimizer == "adamw" else Lamb)
    # A logged step k holds the loss before its update, on batch k - 1, at rate schedule(k - 1).
    ours = [m for m in read_metrics(workdir) if "split" not in m]
    assert [m["step"] for m in ours] == list(range(1, STEPS + 1))
    for step, (mine, reference) in enumerate(zip(ours, theirs), 1):
        assert mine["loss"] == pytest.approx(reference["loss"], rel=RTOL), step
        assert mine["grad_norm"] == pytest.approx(reference["grad_norm"], rel=RTOL), step
        assert mine["learning_rate"] == pytest.approx(reference["learning_rate"], rel=1e-6,
                                                      abs=1e-12), step
    norms = [m["grad_norm"] for m in ours]
    assert min(norms) < CLIP < max(norms)  # both branches of the clipping taken
    assert max(m["learning_rate"] for m in ours) == pytest.approx(LEARNING_RATE)

    exported = transformers.BertForPreTraining.from_pretrained(workdir / "export").state_dict()
    initial = transformers.BertForPreTraining.from_pretrained(init).state_dict()
    assert set(exported) == set(weights)
    for name, reference in weights.items():
        np.testing.assert_allclose(exported[name].numpy(), reference, rtol=RTOL, atol=ATOL,
                                   err_msg=name)
        # Not a vacuous match: every tensor moved by more than the tolerance, but the key
        # biases, which shift all of a query's scores alike: softmax ignores them (zero grad).
        moved = not np.allclose(reference, initial[name].numpy(), rtol=RTOL, atol=ATOL)
        assert moved != name.endswith("attention.self.key.bias"), name
