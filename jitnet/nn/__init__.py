"""Neural-network layers, losses and initializers."""
from . import decoding, functional, init, utils
from .attention_decoder import AttentionDecoderCell
from .dnc_memory import DNCMemory
from .attention import BahdanauAttention, LuongAttention, additive_attention, dot_product_attention
from .functional import (binary_cross_entropy_with_logits, cross_entropy, huber_loss, l1_regularizer, l2_loss,
                         l2_regularizer, max_norm, mse_loss, nce_loss, sampled_softmax_loss)
from .layers import (AvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Embedding, Flatten, Identity,
                     LeakyReLU, Linear, LogSoftmax, MaxPool2d, ReLU, Sigmoid, Softmax, Tanh, get_initializer)
from .losses import BCEWithLogitsLoss, CrossEntropyLoss, HuberLoss, L1Loss, MSELoss, SmoothL1Loss
from .module import Module, ModuleList, Sequential
from .recurrent import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from ..tensor import Parameter, Variable

__all__ = ["functional", "init", "utils", "CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss", "L1Loss",
           "HuberLoss", "SmoothL1Loss", "Module", "Sequential", "ModuleList", "Parameter", "Variable", "Linear",
           "Conv2d", "MaxPool2d", "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "Dropout", "Embedding", "ReLU",
           "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "LeakyReLU", "Identity", "Flatten", "get_initializer",
           "RNNCell", "LSTMCell", "GRUCell", "RNN", "LSTM", "GRU", "LuongAttention", "BahdanauAttention",
           "dot_product_attention", "additive_attention", "cross_entropy", "binary_cross_entropy_with_logits",
           "mse_loss", "l2_loss", "huber_loss", "nce_loss", "sampled_softmax_loss", "l1_regularizer",
           "l2_regularizer", "max_norm", "DNCMemory", "decoding", "AttentionDecoderCell"]
