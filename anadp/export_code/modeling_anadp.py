"""A BERT classifier that reads the mean of the real tokens' last hidden states.

Written by `python -m anadp.export` beside the weights of a model trained with
`model.pooling=mean` (sentence-transformers' convention): Hugging Face's
BertForSequenceClassification reads the pooler on [CLS] instead, a different
function, so this folder ships its own class. Load it with

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

The config's own model_type (not "bert") makes transformers refuse to load the
folder without trust_remote_code rather than build the pooler model silently.
Needs torch and transformers only.
"""
import torch
from torch import nn
from transformers import BertConfig
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertModel, BertPreTrainedModel


class AnadpBertMeanConfig(BertConfig):
    model_type = "anadp_bert_mean"


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens whose mask is 1 (padding counts 0; the count is clamped
    at 1e-9, as sentence-transformers and the JAX model that trained this compute it)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=-2) / mask.sum(dim=-2).clamp(min=1e-9)


class AnadpBertMeanForSequenceClassification(BertPreTrainedModel):
    config_class = AnadpBertMeanConfig
    config: AnadpBertMeanConfig

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs):
        if attention_mask is None:
            shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
            device = input_ids.device if input_ids is not None else inputs_embeds.device
            attention_mask = torch.ones(shape, dtype=torch.long, device=device)
        outputs = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
        pooled = masked_mean(outputs.last_hidden_state, attention_mask)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)
