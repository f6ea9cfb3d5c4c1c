"""Running trained models: model files, runners (torch/ONNX Runtime), whole-CT inference, export."""
