"""``python -m lgvq_plugins.run`` under torchrun, plus two test-only additions
(driven by ``tests/test_torchrun.py``):

* after ``Experiment.run`` every rank writes its whole model (tokenizer, guidance heads
  and discriminator) to ``<run dir>/state_rank<r>.safetensors``, so the test can compare
  the ranks with each other and with another run;
* ``LGVQ_TEST_KILL_AT_STEP=n``: every rank SIGKILLs itself when it is about to train step
  n + 1 (after step n's checkpoint), a real kill of the whole job.

    torchrun --nproc_per_node 2 tests/scripts/ddp_run.py --gin gin/tiny.gin --root OUT ...
"""

from __future__ import annotations

import os
import signal
import sys

from safetensors.torch import save_file

from lgvq_plugins.run import main
from lgvq_plugins.training import distributed as D
from lgvq_plugins.training.experiment import Experiment
from lgvq_plugins.training.trainer import Trainer

kill_at = os.environ.get("LGVQ_TEST_KILL_AT_STEP")
if kill_at:
    train_step = Trainer.train_step

    def train_step_or_die(self, micro):
        if self.step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(self, micro)

    Trainer.train_step = train_step_or_die

run = Experiment.run


def run_and_dump(self):
    metrics = run(self)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in self.model.state_dict().items()}
    save_file(state, str(self.run_dir / f"state_rank{D.rank()}.safetensors"))
    return metrics


Experiment.run = run_and_dump

if __name__ == "__main__":
    main(sys.argv[1:])
