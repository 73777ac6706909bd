"""TRL's `SFTTrainer` and `DPOTrainer` with the dendrite schedule (docs/trl.md).

    from hf_dendrites import DendriticSFTConfig, DendriticSFTTrainer

    args = DendriticSFTConfig(output_dir="out", eval_strategy="steps", eval_steps=50, max_dendrite_cycles=2)
    trainer = DendriticSFTTrainer(model="path/or/hub-id", args=args, train_dataset=train, eval_dataset=valid)
    trainer.train()

Each class is the recipe of docs/trl.md applied to a TRL class: the config is `DendriteScheduleArguments` mixed into
TRL's config, the trainer `DendriticTrainerMixin` mixed into TRL's trainer. TRL's `__init__` runs first and unchanged
(model loaded from a string id with `model_init_kwargs`, `peft_config`, dataset preparation, its fused LM head, the
reference model of DPO); the model it prepared is then converted with `dendrite_config`. The model card written at
every checkpoint and pushed is the dendritic one, with TRL's tags ("trl", "sft" / "dpo"). Needs TRL:
`pip install "hf_dendrites[trl]"`.
"""

from __future__ import annotations

from dataclasses import dataclass

try:
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
except ImportError as err:  # pragma: no cover - exercised by a subprocess test without TRL
    raise ImportError(
        f'hf_dendrites\' TRL trainers need TRL, which could not be imported ({err}): pip install "hf_dendrites[trl]"'
    ) from err

from .trainer import DendriticTrainerMixin
from .training_args import DendriteScheduleArguments

__all__ = ["DendriticDPOConfig", "DendriticDPOTrainer", "DendriticSFTConfig", "DendriticSFTTrainer"]


@dataclass
class DendriticSFTConfig(DendriteScheduleArguments, SFTConfig):
    """TRL's `SFTConfig` plus the settings of the dendrite schedule (`DendriteScheduleArguments`, docs/schedule.md).

    Training needs evaluations (`eval_strategy`, an `eval_dataset`); the score is `metric_for_best_model` (default
    "loss"). TRL's defaults stay TRL's (e.g. `gradient_checkpointing=True`, `bf16` unless `fp16`).
    """


class DendriticSFTTrainer(DendriticTrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` that grows dendrites when the evaluation score plateaus (docs/trl.md).

    Takes every argument of `SFTTrainer` (a string model id with `model_init_kwargs`, `peft_config`,
    `formatting_func`, ...) plus `dendrite_config`; `args` must be a `DendriticSFTConfig`. The model TRL prepared is
    converted with `dendrite_config` after `SFTTrainer.__init__`.
    """

    dendrite_args_class = DendriticSFTConfig


@dataclass
class DendriticDPOConfig(DendriteScheduleArguments, DPOConfig):
    """TRL's `DPOConfig` plus the settings of the dendrite schedule (`DendriteScheduleArguments`, docs/schedule.md).

    The schedule's score is `metric_for_best_model` (default "loss", the DPO loss on the evaluation set; e.g.
    "rewards/accuracies" with `greater_is_better=True`).
    """


class DendriticDPOTrainer(DendriticTrainerMixin, DPOTrainer):
    """TRL's `DPOTrainer` that grows dendrites when the evaluation score plateaus (docs/trl.md).

    Takes every argument of `DPOTrainer` plus `dendrite_config`; `args` must be a `DendriticDPOConfig`. The policy
    TRL prepared is converted after `DPOTrainer.__init__`; the reference model (given, loaded by TRL, or the policy
    with its adapter disabled under PEFT) stays a plain model.
    """

    dendrite_args_class = DendriticDPOConfig
