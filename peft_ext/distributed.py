"""What every script run under torchrun does at its end."""
import torch


def end_process_group() -> None:
    """Take the process group down on every rank together, once all have finished (rank 0's writes included).

    Left to the interpreter's exit, gloo's threads can abort the process there; taken down while another rank
    is still busy, it can hang that rank's shutdown (1 in 8 two-process finetune runs under load did).
    """
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
