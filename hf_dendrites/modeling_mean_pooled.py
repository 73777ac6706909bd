"""`BertForMeanPooledClassification`: BERT with a linear classifier on the mean of its token states.

Sentence-embedding encoders such as all-MiniLM-L6-v2 were trained on the mean of their token states; their [CLS]
state varies little between inputs, so transformers' `BertForSequenceClassification` ([CLS] pooler) learns slowly
on them. This head classifies the attention-masked mean instead (`examples/text_classification.py` uses it).

The class is registered for `AutoModelForSequenceClassification`: `save_pretrained` copies this file next to the
weights and records it in `config.json`'s `auto_map`, so a saved folder loads

- with `hf_dendrites.DendriticModel.from_pretrained(folder)` (dendrites included), which recognises the class and
  builds it from this module as installed; it never runs the copy in the folder;
- with `AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)` in plain transformers
  (without dendrites), which runs the copied file. Without `trust_remote_code` transformers builds its own
  `BertForSequenceClassification` instead, whose [CLS] pooler is not in the checkpoint: its load report lists
  `bert.pooler.dense.*` as MISSING (newly initialised), and its outputs are not the saved model's.

This file imports only torch and transformers, so that the copy in a saved folder runs on its own.
"""

import torch
from torch import nn
from transformers import BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class BertForMeanPooledClassification(BertPreTrainedModel):
    """BERT (without its [CLS] pooler) and a linear classifier on the attention-masked mean of the last hidden states.

    A regular `PreTrainedModel`: `from_pretrained` on any BERT checkpoint builds it (the classifier is new), and its
    weights keep BERT's names (`bert.*`, `classifier.*`). Loss: cross-entropy, or mean squared error when
    `config.num_labels == 1`.
    """

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
        ).last_hidden_state
        mask = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


BertForMeanPooledClassification.register_for_auto_class("AutoModelForSequenceClassification")
