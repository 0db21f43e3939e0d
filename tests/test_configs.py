"""Every YAML in configs/ parses and instantiates; overlays compose with their base and run a step when tiny."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS

from mmclin.cli import build_cli

RUNNABLE = sorted(CONFIGS.glob("*.yaml"))
OVERLAYS = sorted((CONFIGS / "overlays").glob("*.yaml"))
BASE_OF_OVERLAY = {name: "derm-clip.yaml" for name in ("derm1m-vitb16.yaml", "fsdp.yaml", "ddp-cpu.yaml",
                                                        "tensorboard.yaml", "mlflow.yaml", "ham10000.yaml")}
BASE_OF_OVERLAY["llm-1b-lora.yaml"] = "ecg-qa-xattn.yaml"
BASE_OF_OVERLAY["deeptumorvqa.yaml"] = "ct-vqa.yaml"
BASE_OF_OVERLAY["mmedpo-lora.yaml"] = "fundus-report-mmedpo.yaml"
ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]


def test_every_config_is_covered():
    assert RUNNABLE and {p.name for p in OVERLAYS} <= set(BASE_OF_OVERLAY)


# Configs that start from a supervised checkpoint (tests/test_mmedpo.py runs them with one)
NEEDS_CHECKPOINT = {"fundus-report-mmedpo.yaml", "ecg-qa-mmedpo.yaml", "ct-vqa-mmedpo.yaml"}


@pytest.mark.parametrize("config", RUNNABLE, ids=lambda p: p.name)
def test_config_instantiates(config: Path, demo_cache):
    if config.name in NEEDS_CHECKPOINT:  # as is, it says what it needs
        from mmclin.errors import ConfigError

        with pytest.raises((ConfigError, ValueError), match="init_from"):
            build_cli(["-c", str(config)], run=False)
        return
    cli = build_cli(["-c", str(config)], run=False)
    assert cli.model is not None and cli.datamodule is not None and cli.trainer is not None


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_parses_on_its_base(overlay: Path, demo_cache):
    base = CONFIGS / BASE_OF_OVERLAY[overlay.name]
    if base.name in NEEDS_CHECKPOINT:  # parsed and run with a checkpoint in tests/test_mmedpo.py
        with pytest.raises((ValueError,), match="init_from"):
            build_cli(["-c", str(base), "-c", str(overlay), *ON_CPU], run=False)
        return
    strategy = [] if overlay.name == "ddp-cpu.yaml" else ["--trainer.strategy", "auto"]
    tiny = ["--model.init_args.model_config", yaml.safe_dump(_tiny_vision_only())] if "vitb16" in overlay.name else []
    if overlay.name == "llm-1b-lora.yaml":  # the real LM is the user's; build the tiny one with the same LoRA setup
        tiny = ["--model.init_args.lm", yaml.safe_dump({"tiny": {"hidden_size": 32}, "freeze": "all_but_lora",
                                                        "lora": {"r": 4, "alpha": 8}})]
    if overlay.name == "deeptumorvqa.yaml":  # parse at full size, build a small ViT
        tiny = ["--model.init_args.encoders.volume.init_args.hidden_size", "48",
                "--model.init_args.encoders.volume.init_args.num_layers", "1",
                "--model.init_args.encoders.volume.init_args.num_heads", "2"]
    cli = build_cli(["-c", str(base), "-c", str(overlay), *ON_CPU, *strategy, *tiny], run=False)
    assert cli.trainer is not None


def test_ct_vqa_with_deeptumorvqa_and_lora_overlays_runs_a_step(demo_cache, tmp_path):
    """The real-use stack (DeepTumorVQA preprocessing, 1B LM with LoRA) on the demo, shrunk to run on a CPU."""
    override = tmp_path / "tiny.yaml"
    override.write_text(yaml.safe_dump({
        "trainer": _one_step_on_cpu(tmp_path, "auto"),
        "model": {"init_args": {
            "encoders": {"volume": {"class_path": "encoders.volume.ViT3DEncoder",
                                    "init_args": {"img_size": [16, 32, 32], "patch_size": [4, 8, 8], "hidden_size": 32,
                                                  "mlp_dim": 64, "num_layers": 1, "num_heads": 2}}},
            "connector": {"class_path": "mmclin.fusion.SpatialPoolProjector", "init_args": {"grid": [4, 4, 4]}},
            "lm": {"tiny": {"hidden_size": 32}, "dtype": "bfloat16", "freeze": "all_but_lora",
                   "lora": {"r": 4, "alpha": 8}},
            "max_new_tokens": 4}},
        "data": {"init_args": {"root": None, "questions": None, "volume_pattern": None, "spacing": None,
                               "grid": [16, 32, 32], "batch_size": 2, "num_workers": 0,
                               "demo": {"n_volumes": 8}}},
    }))
    cli = build_cli(["fit", "-c", str(CONFIGS / "ct-vqa.yaml"), "-c", str(CONFIGS / "overlays/deeptumorvqa.yaml"),
                     "-c", str(CONFIGS / "overlays/llm-1b-lora.yaml"), "-c", str(override)])
    assert cli.trainer.global_step == 1
    assert cli.datamodule.preprocessing.hu_window == (-1000.0, 1000.0)  # the overlay's window, as Merlin / CT-CLIP
    trainable = [n for n, p in cli.model.lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def _one_step_on_cpu(tmp_path: Path, strategy: str) -> dict:
    """Trainer settings of an overlay smoke test: one training step and one validation batch on the CPU."""
    return {"accelerator": "cpu", "devices": 1, "strategy": strategy, "max_steps": 1, "max_epochs": 1,
            "limit_val_batches": 1, "default_root_dir": str(tmp_path),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}}


def _tiny_vision_only(text_cfg: dict | None = None) -> dict:
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": text_cfg or {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A randomly initialised BERT with its tokenizer, saved like a local copy of PubMedBERT."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "of", "lesion", "skin", "melanoma", "nevus", "image"]
    (path / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(100)]))
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    config = BertConfig(vocab_size=112, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return path


def test_derm1m_overlay_runs_a_step_with_a_local_hf_text_tower(tiny_bert_dir, demo_cache, tmp_path):
    text_cfg = {"hf_model_name": str(tiny_bert_dir), "hf_tokenizer_name": str(tiny_bert_dir), "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 32}
    override = tmp_path / "tiny.yaml"
    override.write_text(yaml.safe_dump({
        "trainer": _one_step_on_cpu(tmp_path, "ddp"),
        "model": {"init_args": {"model_config": _tiny_vision_only(text_cfg), "warmup": 0}},
        "data": {"init_args": {"batch_size": 8, "num_workers": 0, "demo_lesions_per_class": 4,
                               "demo_image_size": 32}},
    }))
    cli = build_cli(["fit", "-c", str(CONFIGS / "derm-clip.yaml"), "-c", str(CONFIGS / "overlays/derm1m-vitb16.yaml"),
                     "-c", str(override)])
    assert cli.trainer.global_step == 1
    assert type(cli.model.model.text).__name__ == "HFTextEncoder"
    (metrics,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule)
    assert 0 <= metrics["val/zs_bacc"] <= 1
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert {"test/zs_bacc", "test/i2t_r10"} <= set(metrics)


def test_fsdp_overlay_builds_its_strategy():
    """FSDP needs GPUs to run; here its strategy block is checked by building the strategy object."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy, Strategy
    from open_clip.transformer import ResidualAttentionBlock

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    block = yaml.safe_load((CONFIGS / "overlays" / "fsdp.yaml").read_text())["trainer"]["strategy"]
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": block})).strategy
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]  # Lightning turns the class list into a ModuleWrapPolicy
    assert ResidualAttentionBlock in policy._module_classes


def test_llm_lora_overlay_runs_a_step(demo_cache, tmp_path):
    override = tmp_path / "tiny.yaml"
    override.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 1, "max_epochs": 1, "limit_val_batches": 1,
                    "default_root_dir": str(tmp_path),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path)}}},
        "model": {"init_args": {"lm": {"tiny": {"hidden_size": 32}, "dtype": "bfloat16", "freeze": "all_but_lora",
                                       "lora": {"r": 4, "alpha": 8}}}},
        "data": {"init_args": {"batch_size": 4, "demo_records": 80}},
    }))
    cli = build_cli(["fit", "-c", str(CONFIGS / "ecg-qa-xattn.yaml"), "-c", str(CONFIGS / "overlays/llm-1b-lora.yaml"),
                     "-c", str(override)])
    assert cli.trainer.global_step == 1
    trainable = [n for n, p in cli.model.lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def _resolved(*args: str) -> dict:
    """The whole config `--print_config` shows for these arguments."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_cli([*args, "--print_config"], run=False)
    return yaml.safe_load(out.getvalue())


def test_a_variant_is_its_twin_with_its_differences():
    """`config:` applies the twin (and, through it, the shared defaults) first, key by key, then the variant."""
    variant = _resolved("-c", str(CONFIGS / "ecg-qa-xattn.yaml"))
    twin_args = ["-c", str(CONFIGS / "ecg-qa-softprompt.yaml"), "-c", str(CONFIGS / "base" / "xattn.yaml")]
    twin = _resolved(*twin_args, "--trainer.default_root_dir", "runs/ecg-qa-xattn",
                     "--model.init_args.encoders.series.init_args.window", "32",
                     "--model.init_args.connector", "mmclin.fusion.PerceiverResampler",
                     "--model.init_args.connector.init_args.n_latents", "16",
                     "--model.init_args.connector.init_args.depth", "1")
    assert variant == twin
    encoder = variant["model"]["init_args"]["encoders"]["series"]["init_args"]
    assert encoder["window"] == 32 and encoder["n_channels"] == 12  # the variant's setting beside the twin's
    trainer = variant["trainer"]
    assert trainer["log_every_n_steps"] == 10 and trainer["max_epochs"] == 8  # base/defaults.yaml, the twin
    assert [c["class_path"].rsplit(".", 1)[-1] for c in trainer["callbacks"]] == [
        "JSONLPredictionWriter", "BestCheckpoint", "ExactResume"]


def test_a_config_including_itself_or_a_missing_file_is_named(tmp_path):
    from mmclin.errors import ConfigError

    (tmp_path / "a.yaml").write_text("config: b.yaml\n")
    (tmp_path / "b.yaml").write_text("config: a.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml: config: includes itself"):
        build_cli(["-c", str(tmp_path / "a.yaml")], run=False)
    (tmp_path / "c.yaml").write_text("config: base/nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml: config: 'base/nowhere.yaml' not found"):
        build_cli(["-c", str(tmp_path / "c.yaml")], run=False)


def test_the_logger_writes_under_the_run_directory_unless_told_otherwise(demo_cache, tmp_path):
    cli = build_cli(["-c", str(CONFIGS / "derm-clip.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")],
                    run=False)
    assert cli.trainer.logger.save_dir == str(tmp_path / "run")
    assert _resolved("-c", str(CONFIGS / "derm-clip.yaml"))["trainer"]["default_root_dir"] == "runs/derm-clip"
    cli = build_cli(["-c", str(CONFIGS / "derm-clip.yaml"), "--trainer.default_root_dir", str(tmp_path / "run"),
                     "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")], run=False)
    assert cli.trainer.logger.save_dir == str(tmp_path / "logs")
