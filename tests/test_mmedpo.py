"""MMedPO-style alignment: pairs that differ clinically, the weighted DPO loss, the frozen reference, bad pair files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, fit_ecg_qa

from mmclin.cli import build_cli
from mmclin.cli import main as cli_main
from mmclin.errors import DataError
from mmclin.preference.loss import weighted_dpo_loss
from mmclin.preference.pairs import INJECTED, WORDING_WEIGHT, clinical_weight, inject_fundus_errors, noise_region
from mmclin.tasks.report import parse_grade, parse_lesions, parse_referral

# Written as graders write them: eye labels, abbreviations, hedges, list negations, British/American spelling
REPORTS = [
    "Right eye: scattered dot and blot haemorrhages and a few microaneurysms. No neovascularisation. "
    "Impression: moderate non-proliferative diabetic retinopathy, refer routinely.",
    "Left eye: hard exudates near the fovea, possible early macular oedema. No new vessels seen. "
    "Assessment: severe non-proliferative diabetic retinopathy; refer soon.",
    "Unremarkable fundus. No microaneurysms, haemorrhages or exudates. Conclusion: no diabetic retinopathy, "
    "no referral needed.",
    "Neovascularisation at the disc with a boat-shaped preretinal hemorrhage. Impression: proliferative diabetic "
    "retinopathy, refer urgently.",
]


def _content(text: str):
    return parse_grade(text), parse_referral(text), frozenset(parse_lesions(text)), "right eye" in text.lower()


@pytest.mark.parametrize("report", REPORTS)
def test_every_injected_kind_changes_what_the_report_says_clinically(report):
    found = inject_fundus_errors(report, np.random.default_rng(0))
    kinds = {k for k, _ in found}
    assert {"severity", "referral", "false_finding", "negation"} <= kinds, kinds
    for kind, rejected in found:
        assert _content(rejected) != _content(report), (kind, rejected)
        assert clinical_weight(report, rejected) > WORDING_WEIGHT
    by_kind = dict(found)
    assert parse_lesions(by_kind["false_finding"]) > parse_lesions(report)  # a lesion invented, none lost
    if "omission" in by_kind:
        assert parse_lesions(by_kind["omission"]) < parse_lesions(report)
    if "Right eye" in report or "Left eye" in report:
        assert "laterality" in kinds
    assert set(kinds) <= set(INJECTED)


def test_clinical_weights_rank_mistakes_by_what_they_cost():
    report = REPORTS[0]
    wording = report.replace("scattered", "several")
    one_grade = report.replace("moderate non-proliferative", "severe non-proliferative")
    invented = report.replace("No neovascularisation.", "Neovascularisation at the disc.")
    assert clinical_weight(report, wording) == WORDING_WEIGHT
    assert clinical_weight(report, one_grade) == 1.0
    assert clinical_weight(report, invented) >= 1.5
    assert clinical_weight("yes", "no", ["yes", "no"]) == 1.0


def test_lesion_noise_stays_inside_the_mask():
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[4:10, 20:30] = True
    noised = noise_region(image, mask, torch.Generator().manual_seed(1), sigma=1.0)
    assert torch.equal(noised[:, ~mask], image[:, ~mask])
    assert (noised[:, mask] - image[:, mask]).std() == pytest.approx(1.0, abs=0.2)


def test_weighted_loss_matches_a_hand_computation():
    pc, pr = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-12.0, -18.0, -9.0])
    rc, rr = torch.tensor([-11.0, -19.0, -6.0]), torch.tensor([-11.5, -19.0, -8.0])
    w = torch.tensor([1.0, 3.0, 2.0])
    beta, eps = 0.5, 0.1
    expected = 0.0
    for i in range(3):
        m = (pc[i] - pr[i]) - (rc[i] - rr[i])
        li = -(1 - eps) * math.log(1 / (1 + math.exp(-beta * m))) - eps * math.log(1 / (1 + math.exp(beta * m)))
        expected += float(w[i]) / 2.0 * li  # weights over their batch mean (2)
    out = weighted_dpo_loss(pc, pr, rc, rr, w, beta, eps)
    assert float(out.loss) == pytest.approx(expected / 3, rel=1e-6)
    assert torch.allclose(out.chosen_rewards, beta * (pc - rc))
    uniform = weighted_dpo_loss(pc, pr, rc, rr, None, beta, 0.0)
    assert float(uniform.loss) == pytest.approx(float(-F.logsigmoid(beta * ((pc - pr) - (rc - rr))).mean()))


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory, demo_cache) -> Path:
    """A few supervised steps of the fundus report config on a small demo."""
    root = tmp_path_factory.mktemp("sft")
    cli_main(["fit", "-c", str(CONFIGS / "fundus-report.yaml"), "--trainer.max_epochs", "1",
              "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--test_after_fit", "false",
              "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
              "--data.init_args.demo_images", "80", "--trainer.default_root_dir", str(root),
              "--trainer.logger.init_args.save_dir", str(root)])
    return next(root.glob("lightning_logs/version_0/checkpoints/last.ckpt"))


def _mmedpo_cli(ckpt: Path, tmp_path: Path, *extra: str):
    return build_cli(["-c", str(CONFIGS / "fundus-report-mmedpo.yaml"), "--model.init_args.init_from", str(ckpt),
                      "--data.init_args.base.init_args.demo_images", "80", "--trainer.default_root_dir",
                      str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path), *extra], run=False)


def _one_step(cli) -> None:
    cli.trainer.fit_loop.max_epochs = 1
    cli.trainer.limit_train_batches, cli.trainer.limit_val_batches = 1, 0
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_a_step_moves_the_policy_and_leaves_the_reference(sft_checkpoint, tmp_path):
    cli = _mmedpo_cli(sft_checkpoint, tmp_path, "--data.init_args.kinds", "[severity, false_finding]")
    reference = {k: v.clone() for k, v in cli.model.reference.state_dict().items()}
    policy = {k: v.clone() for k, v in cli.model.policy.state_dict().items()}
    _one_step(cli)
    assert all(torch.equal(v, cli.model.reference.state_dict()[k]) for k, v in reference.items())
    assert any(not torch.equal(v, cli.model.policy.state_dict()[k]) for k, v in policy.items())
    pairs = [json.loads(line) for line in next(tmp_path.rglob("pairs.jsonl")).read_text().splitlines()]
    assert {p["kind"] for p in pairs} == {"severity", "false_finding"}


def test_with_lora_the_reference_is_the_supervised_model_with_adapters_off(sft_checkpoint, tmp_path):
    from datamodules.preference import PairDataset
    from mmclin.models.mllm import MultimodalLM

    cli = _mmedpo_cli(sft_checkpoint, tmp_path, "-c", str(CONFIGS / "overlays" / "mmedpo-lora.yaml"),
                      "--trainer.precision", "32-true", "--data.init_args.kinds", "[severity]")
    model = cli.model
    assert model.reference is None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    supervised = MultimodalLM.load_from_checkpoint(sft_checkpoint, map_location="cpu", weights_only=True).eval()
    data = cli.datamodule
    data.setup("fit")
    batch = model.collator([PairDataset(data.base.datasets["train"], data.index, data.train_pairs)[0]])
    with torch.no_grad():
        expected, _, _ = model.sequence_logps(supervised, batch)
    _one_step(cli)
    model.eval()
    module, context = model._reference()
    with torch.no_grad(), context:
        found, _, _ = model.sequence_logps(module, batch)
    assert torch.allclose(found, expected, atol=1e-4)


def test_a_bad_pair_file_names_its_line_or_is_skipped_and_counted(sft_checkpoint, tmp_path):
    from datamodules.preference import PreferenceDataModule

    base = {"class_path": "datamodules.fundus.FundusReportDataModule",
            "init_args": {"image_size": 128, "demo_images": 80}}
    good = {"study": "0001", "prompt": "Describe.", "chosen": "No diabetic retinopathy.",
            "rejected": "Proliferative diabetic retinopathy.", "kind": "severity", "weight": 4.0}
    data = PreferenceDataModule(base)
    data.base.prepare_data()
    data.base.setup("fit")
    study = next(iter({str(data.base.datasets["train"][i]["meta"]["image_id"]) for i in range(3)}))
    good["study"] = study
    cases = {"is not in the data's training split": {**good, "study": "no-such-study"},
             "the rejected answer is empty": {**good, "rejected": " "},
             "chosen and rejected are the same text": {**good, "rejected": good["chosen"]}}
    for words, bad in cases.items():
        path = tmp_path / "pairs.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=rf"pairs.jsonl line 2: .*{words}"):
            PreferenceDataModule(base, pairs=str(path)).setup("fit")
    path.write_text("".join(json.dumps(p) + "\n" for p in [good, *cases.values()]))
    skipping = PreferenceDataModule(base, pairs=str(path), on_bad_pair="skip")
    skipping.setup("fit")
    assert len(skipping.train_pairs) == 1 and sum(skipping.skipped.values()) == 3


def test_the_preference_is_scored_where_the_answers_differ():
    from mmclin.fusion.soft_prompt import IGNORE_INDEX
    from mmclin.models.mmedpo import differing_spans

    x = IGNORE_INDEX
    labels = torch.tensor([[x, x, 1, 2, 3, 7, 8, 9, 4, 5],    # chosen:   1 2 3 [7 8 9] 4 5
                           [x, x, x, 1, 2, 3, 6, 4, 5, x]])   # rejected: 1 2 3 [6] 4 5
    assert differing_spans(labels, 1).tolist() == [[3, 6], [3, 4]]
    omitted = torch.tensor([[1, 2, 3, 4], [1, 4, x, x]])  # rejected drops 2 3: its span is empty
    assert differing_spans(omitted, 1).tolist() == [[1, 3], [1, 1]]


def test_another_studys_report_states_another_grade():
    from mmclin.preference.pairs import other_study_report

    rng = np.random.default_rng(0)
    for report in REPORTS:
        other = other_study_report(report, REPORTS, rng)
        assert other is not None and parse_grade(other) != parse_grade(report)
    assert other_study_report(REPORTS[0], [REPORTS[0]], rng) is None  # no report of another grade


def test_a_record_is_noised_everywhere_in_proportion_to_each_lead():
    from mmclin.preference.pairs import noise_record

    leads = torch.randn(3, 5000) * torch.tensor([[0.1], [1.0], [2.0]])  # mV, leads of different amplitude
    noised = noise_record(leads, torch.Generator().manual_seed(0), sigma=1.0)
    ratio = (noised - leads).std(-1) / leads.std(-1)
    assert torch.allclose(ratio, torch.ones(3), atol=0.05)
    assert bool(((noised - leads).abs() > 0).all())


def test_closed_answers_are_generated_in_full(sft_checkpoint):
    from mmclin.models.mllm import MultimodalLM

    model = MultimodalLM.load_from_checkpoint(sft_checkpoint, map_location="cpu", weights_only=True)
    long_option = "complete right bundle branch block with left anterior fascicular block " * 4
    needed = len(model.tokenizer(" " + long_option, add_special_tokens=False).input_ids) + 1
    assert needed > model.hparams.max_new_tokens
    assert model.generation_length([long_option, "none"]) == needed
    assert model.generation_length(["no", "yes"]) == model.hparams.max_new_tokens
    assert model.generation_length([]) == model.generation_length(None) == model.hparams.max_new_tokens

    # an answer does not depend on the questions beside it in the batch (nor, under DDP, on its rank)
    from datamodules.fundus import FundusReportDataModule

    data = FundusReportDataModule(image_size=128, demo_images=80)
    data.prepare_data()
    data.setup("validate")
    batch = model.collator([data.datasets["val"][i] for i in range(3)])
    alone = model.generate_answers(batch, model.batch_media(batch))
    batch["choices"] = [[long_option, "none"], [], []]
    beside = model.generate_answers(batch, model.batch_media(batch))
    assert beside[1:] == alone[1:]
    assert len(model.tokenizer(beside[0], add_special_tokens=False).input_ids) <= needed


def test_conditional_pairs_prefer_the_answer_given_the_studys_own_input(sft_checkpoint, tmp_path):
    """``other_input``: the same report given another study's photograph of another grade; ``noised_input``:
    given the photograph noised inside its lesion boxes. The rejected rows carry those inputs, and the preference
    is scored on the whole answer."""
    from datamodules.preference import PairDataset

    cli = _mmedpo_cli(sft_checkpoint, tmp_path, "--data.init_args.kinds", "[other_input, noised_input]")
    data = cli.datamodule
    data.setup("fit")
    train = data.base.datasets["train"]
    pairs = PairDataset(train, data.index, data.train_pairs, data.noised, seed=0)
    by_kind = {}
    for i, pair in enumerate(data.train_pairs):
        by_kind.setdefault(pair.kind, i)
    assert set(by_kind) == {"other_input", "noised_input"}

    item = pairs[by_kind["other_input"]]
    pair = data.train_pairs[by_kind["other_input"]]
    other = train[data.index[pair.rejected_study]]
    assert pair.chosen == pair.rejected and pair.rejected_study != pair.study
    assert parse_grade(other["answer"]) != parse_grade(pair.chosen)  # its own report states another grade
    assert torch.equal(item["rejected_media"]["image"][0], other["image"][0])

    i = by_kind["noised_input"]
    item, pair = pairs[i], data.train_pairs[i]
    own, mask = item["image"][0], data.base.lesion_masks("train")[data.index[pair.study]]
    changed = (item["rejected_media"]["image"][0] != own).any(0)
    assert bool(changed.any()) and not bool((changed & ~mask).any())  # noise inside the lesion boxes only
    assert torch.equal(pairs[i]["rejected_media"]["image"][0], item["rejected_media"]["image"][0])  # same each epoch

    batch = cli.model.collator([pairs[by_kind["other_input"]], item])
    assert torch.equal(batch["spans"][:, 0], torch.zeros(4, dtype=torch.long))  # the whole answer
    assert bool((batch["spans"][:, 1] > 0).all())
    _one_step(cli)


def test_a_pair_file_naming_an_unknown_other_input_is_refused(sft_checkpoint, tmp_path):
    from datamodules.preference import PreferenceDataModule

    base = {"class_path": "datamodules.fundus.FundusReportDataModule",
            "init_args": {"image_size": 128, "demo_images": 80}}
    probe = PreferenceDataModule(base)
    probe.base.prepare_data()
    probe.base.setup("fit")
    study = str(probe.base.datasets["train"][0]["meta"]["image_id"])
    text = "No diabetic retinopathy."
    row = {"study": study, "prompt": "Describe.", "chosen": text, "rejected": text, "kind": "other_input",
           "weight": 1.0, "rejected_study": "no-such-study"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl line 1: rejected_study 'no-such-study' is not in"):
        PreferenceDataModule(base, pairs=str(path)).setup("fit")
    path.write_text(json.dumps({**row, "rejected_study": study, "kind": "noised_input"}) + "\n")
    same_text = PreferenceDataModule(base, pairs=str(path))
    same_text.setup("fit")  # a conditional pair's two sides are the same answer: not a bad pair
    assert len(same_text.train_pairs) == 1


def test_ecg_pairs_from_the_models_answers_and_another_record(demo_cache, tmp_path):
    """Closed questions: the supervised model's ranked choice for the noised record is a wrong option; its own
    generation for the unaltered record does not state the right choice; an ``other_input`` pair's other record
    answers the same question otherwise."""
    from mmclin.tasks.qa import parse_choice

    ckpt = fit_ecg_qa(tmp_path, "ecg-qa-softprompt.yaml", "--trainer.max_epochs", "8")  # it answers "no"
    out = tmp_path / "mmedpo"
    cli = build_cli(["-c", str(CONFIGS / "ecg-qa-mmedpo.yaml"), "--model.init_args.init_from", str(ckpt),
                     "--data.init_args.base.init_args.demo_records", "120", "--data.init_args.kinds",
                     "[lesion_noise, own_answer, other_input]", "--trainer.default_root_dir", str(out),
                     "--trainer.logger.init_args.save_dir", str(out), "--trainer.enable_progress_bar", "false"],
                    run=False)
    _one_step(cli)
    data = cli.datamodule
    assert data.base.hparams.demo_records == 120  # the command line reaches the base datamodule
    # the config names no base: it is the data the supervised checkpoint records, and the run records it in turn
    assert data.hparams.base["class_path"] == "datamodules.ecg_qa_data.ECGQADataModule"
    assert data.hparams.init_from == str(ckpt)
    train = data.base.datasets["train"]
    kinds = {p.kind for p in data.train_pairs}
    assert kinds == {"lesion_noise", "own_answer", "other_input"}, (kinds, dict(data.skipped))
    own = [p for p in data.train_pairs if p.kind == "own_answer"]
    answered = data.skipped["own_answer_same_content"] + data.skipped["own_answer_empty"]
    assert len(own) + answered == len(train)  # every question answered once
    for pair in data.train_pairs:
        sample = train[data.index[pair.study]]
        assert pair.chosen == sample["answer"]
        if pair.kind == "lesion_noise":
            assert pair.rejected in sample["choices"] and pair.rejected != pair.chosen
        elif pair.kind == "own_answer":
            assert pair.rejected.strip() and parse_choice(pair.rejected, sample["choices"]) != sample["answer"]
        else:
            other = train[data.index[pair.rejected_study]]
            assert other["question"] == sample["question"] and other["answer"] != sample["answer"]
    first = train[data.index[own[0].study]]  # the rejected side is what the supervised model generates
    assert cli.model.reference_answers([first], generate=True)[0].strip() == own[0].rejected
