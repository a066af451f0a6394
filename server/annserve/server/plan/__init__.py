"""Request -> validated plan -> sampler: validation, splits, samplers, epoch spans, limits."""
