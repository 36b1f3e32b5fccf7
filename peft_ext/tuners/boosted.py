"""The mixin through which SIBO (`peft_ext.sibo`) boosts a tuner's adapters.

It lives apart from sibo because sibo imports the bottleneck tuner, whose model class needs this mixin:
here, either module can be imported first. sibo is imported where its functions are called.
"""
from peft_ext.errors import UsageError


class BoostedTuner:
    """Mixin for a peft tuner (before BaseTuner in the bases) whose adapters SIBO can boost."""

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        from peft_ext import sibo

        super().inject_adapter(model, adapter_name, *args, **kwargs)
        sibo.attach(self, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        from peft_ext import sibo

        sibo.detach(self.model, adapter_name)
        super().delete_adapter(adapter_name)

    def _check_merge_allowed(self):
        from peft_ext import sibo

        super()._check_merge_allowed()
        boosted = sorted(name for name, config in self.peft_config.items() if sibo.is_boosted(config))
        if boosted:
            raise UsageError(
                f"adapters {boosted} use SIBO, whose branch input depends on the token embeddings: "
                "they cannot be merged into the base weights"
            )

    def _unload_and_optionally_merge(self, merge=True, *args, **kwargs):
        from peft_ext import sibo

        if merge:
            self._check_merge_allowed()
        sibo.detach(self.model)
        return super()._unload_and_optionally_merge(merge, *args, **kwargs)
