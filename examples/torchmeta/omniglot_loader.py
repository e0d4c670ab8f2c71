"""torchmeta's README example with the import changed to metacli.torchmeta: 5-way 5-shot Omniglot tasks, 16 a
batch. The data folder is the first argument (default: ``data``), holding ``omniglot/images_*.zip``.

    python examples/torchmeta/omniglot_loader.py ../shared/data
"""
import sys

from metacli.torchmeta.datasets.helpers import omniglot
from metacli.torchmeta.utils.data import BatchMetaDataLoader

folder = sys.argv[1] if len(sys.argv) > 1 else "data"
dataset = omniglot(folder, ways=5, shots=5, test_shots=15, meta_train=True, download=True)
dataloader = BatchMetaDataLoader(dataset, batch_size=16, num_workers=0)

for batch in dataloader:
    train_inputs, train_targets = batch["train"]
    print('Train inputs shape: {0}'.format(train_inputs.shape))    # (16, 25, 1, 28, 28)
    print('Train targets shape: {0}'.format(train_targets.shape))  # (16, 25)

    test_inputs, test_targets = batch["test"]
    print('Test inputs shape: {0}'.format(test_inputs.shape))      # (16, 75, 1, 28, 28)
    print('Test targets shape: {0}'.format(test_targets.shape))    # (16, 75)
    break
