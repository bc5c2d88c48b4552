"""The inference engine: loaders, backends, samplers and the batched Patched FLANNEL data flow."""
