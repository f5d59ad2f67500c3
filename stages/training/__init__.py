"""Helpers of the train stage (model loading, optimizers and schedules, ReLoRA restarts): a
package, not a stage, so the train stage may import it."""
