#pragma once
// The four recurrent cells, named as in the op schemas ("lstm", "gru", "rnn_tanh", "rnn_relu").
namespace fastseq {

enum class CellMode : int { kLSTM = 0, kGRU = 1, kRNNTanh = 2, kRNNRelu = 3 };

}  // namespace fastseq
