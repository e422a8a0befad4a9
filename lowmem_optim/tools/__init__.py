"""Tools over the optimizers: the memory model (:mod:`.memory`, its optimizer side in
:mod:`.memory_optimizer`), which setup fits a card
(:mod:`.memory_fit`), the storage trace of a step on valueless tensors (:mod:`.memory_trace`), their
console script (:mod:`.cli`), the LLaMA config reader (:mod:`.llama_config`), the op counter
(:mod:`.op_count`) and the bytes the sharded optimizers' collectives send (:mod:`.traffic`). They
import the optimizers; no optimizer imports them."""
