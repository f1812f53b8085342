"""A TorchServe handler that answers the model's RAW probabilities, in the shapes TorchServe
handlers return: one `.npy` image -> a probability list; a `.npy` batch -> a list of lists;
a model whose name ends in `-topk` -> TorchServe's own top-5 `{label: probability}` dict
(`ts.utils.util.map_class_to_label`). The upstream that ext_proc protects in the tests."""

import io

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import map_class_to_label


class RawProbabilities(BaseHandler):
    def preprocess(self, data):
        self.batched = []
        arrays = []
        for row in data:
            payload = row.get("data") or row.get("body")
            array = np.load(io.BytesIO(bytes(payload)), allow_pickle=False).astype(np.float32)
            self.batched.append(array.ndim == 4)
            arrays.append(array if array.ndim == 4 else array[None])
        self.sizes = [len(a) for a in arrays]
        return torch.from_numpy(np.concatenate(arrays))

    def inference(self, data, *args, **kwargs):
        with torch.inference_mode():
            return torch.softmax(self.model(data).double(), dim=1)

    def postprocess(self, data):
        top_k = self.context.manifest["model"]["modelName"].endswith("-topk")
        answers = []
        for rows, batched in zip(torch.split(data, self.sizes), self.batched, strict=True):
            if top_k:
                probs, classes = torch.topk(rows, 5, dim=1)
                labels = map_class_to_label(probs.tolist(), None, classes.tolist())
                answers.append(labels if batched else labels[0])
            else:
                answers.append(rows.tolist() if batched else rows[0].tolist())
        return answers
