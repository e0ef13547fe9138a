"""Real runtimes for a QuantSim: the ONNX QDQ export (`export`) and the engines that run it (`onnxruntime`)."""
