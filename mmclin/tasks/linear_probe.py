"""Linear probe on frozen image features: what a CLIP image tower knows, apart from its text side.

A logistic regression (scikit-learn) is fitted on the training split's image embeddings and scored on the test
split, beside the zero-shot figures, as CLIP's own evaluation does (Radford et al. 2021, linear-probe protocol).
Zero-shot far below the probe means the text side, not the features, is what limits the model.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader
from tqdm import tqdm

from mmclin.tasks.zero_shot import zero_shot_figures_with_ci


@torch.no_grad()
def image_features(module: L.LightningModule, dataset, batch_size: int = 128, desc: str = "") -> tuple:
    """L2-normalised image embeddings (N, D) as numpy and the labels (N,) of a dataset of ``{"image", "label"}``."""
    features, labels = [], []
    was_training = module.training
    module.eval()
    for batch in tqdm(DataLoader(dataset, batch_size=batch_size), desc=desc, leave=False):
        image, _ = module.encode(batch["image"].to(module.device))
        features.append(image.float().cpu())
        labels.append(torch.as_tensor(batch["label"]))
    module.train(was_training)
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 classnames: list[str], binary_pairs: dict[str, list[str]] | None = None, c: float = 1.0) -> dict:
    """Fit a class-balanced logistic regression on (train_x, train_y); the test figures with bootstrap intervals.

    Returns the keys of :func:`~mmclin.tasks.zero_shot.zero_shot_figures_with_ci` with ``probe_`` in place of
    ``zs_`` (balanced accuracy, macro AUROC, the two-class AUROCs, per-class recall).
    """
    keep_train, keep_test = train_y >= 0, test_y >= 0
    scaler = StandardScaler().fit(train_x[keep_train])
    classifier = LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
    classifier.fit(scaler.transform(train_x[keep_train]), train_y[keep_train])
    # Columns for every class, also those absent from the training split (never predicted).
    logits = np.full((int(keep_test.sum()), len(classnames)), -1e4, dtype=np.float32)
    decision = classifier.decision_function(scaler.transform(test_x[keep_test]))
    logits[:, classifier.classes_] = decision if decision.ndim == 2 else np.stack([-decision, decision], 1)
    figures = zero_shot_figures_with_ci(torch.from_numpy(logits), torch.from_numpy(test_y[keep_test]), classnames,
                                        binary_pairs)
    return {key.replace("zs_", "probe_", 1): value for key, value in figures.items()}


class LinearProbe(L.Callback):
    """After testing a CLIP model, fit a linear probe on the training split's frozen image features and log its
    test figures as ``test/probe_bacc``, ``test/probe_auroc``, ... beside the zero-shot ones.

    The datamodule gives the splits with its evaluation transform (``eval_dataset(split)``); the model gives the
    class names and the two-class AUROCs it logs.
    """

    def __init__(self, c: float = 1.0, batch_size: int = 128):
        """
        Args:
            c: inverse L2 regularisation strength of the logistic regression (scikit-learn's ``C``).
            batch_size: batch size for encoding the images.
        """
        self.c, self.batch_size = c, batch_size

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = pl_module.hparams.get("classnames")
        data = trainer.datamodule
        if not names or data is None or trainer.sanity_checking:
            return
        train_x, train_y = image_features(pl_module, data.eval_dataset("train"), self.batch_size, "probe: train")
        test_x, test_y = image_features(pl_module, data.eval_dataset("test"), self.batch_size, "probe: test")
        if (train_y >= 0).sum() == 0 or (test_y >= 0).sum() == 0:
            return
        figures = linear_probe(train_x, train_y, test_x, test_y, list(names), pl_module.hparams.get("binary_aurocs"),
                               self.c)
        pl_module.log_dict({f"test/{k}": v for k, v in figures.items()})
