"""Run planning: sizing a run to a compute budget (planner, allocate), memory per device, scaling
ladders and law fits. Device peaks live below both planning and training, in spud.hardware."""
