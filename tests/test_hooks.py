"""The hook registry: order, names, removal in any order, per-run reset, exact restore, other libraries'
patches, and a cache and quantisation composed on one network."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import hasten
from hasten._context import sampling_run
from hasten.accel import DeepCacheConfig, accelerate_, accelerator_of
from hasten.hooks import add_hook, get_hook, hooked_modules, hooks_of, remove_hook, remove_hooks
from hasten.quant import MIN_SAMPLES, QuantConfig, QuantizedLayer, collect_calibration, modules, quantize_
from hasten.quant.modules import TIME_HOOK, network_time, publish_network_time
from test_accel import tiny_unet  # the same tiny diffusers UNet as the cache tests


class AddOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("one", torch.ones(1))

    def forward(self, x):
        return x + self.one


def times(k):
    return lambda forward, x: forward(x) * k


def plus(k):
    return lambda forward, x: forward(x) + k


def forward_attributes(net: nn.Module) -> dict[str, object]:
    """Every ``forward`` and registry found in the modules' instance dicts (what hooks must leave as they were)."""
    return {
        f"{name}.{key}": m.__dict__[key]
        for name, m in net.named_modules()
        for key in ("forward", "_hasten_hooks")
        if key in m.__dict__
    }


# -- the registry -----------------------------------------------------------------------------------


def test_a_hook_wraps_the_ones_added_before_it():
    m = AddOne()
    x = torch.tensor([1.0])
    add_hook(m, "double", times(2))
    add_hook(m, "plus10", plus(10))
    assert hooks_of(m).names == ("double", "plus10")
    assert torch.equal(m(x), (x + 1) * 2 + 10)  # plus10 is outermost


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_hooks_come_off_in_any_order_and_leave_the_module_as_it_was(order):
    m = AddOne()
    x = torch.tensor([3.0])
    buffers = dict(m.named_buffers())
    hooks = {"a": times(2), "b": plus(10), "c": times(-1)}
    handles = [add_hook(m, name, hook) for name, hook in hooks.items()]
    left = list(hooks)
    for index in order:
        handles[index].remove()
        left.remove(handles[index].name)
        expected = x + 1
        for name in left:  # the remaining ones, still in their order
            expected = hooks[name](lambda v, e=expected: e, x)
        assert torch.equal(m(x), expected), (order, left)
    assert "forward" not in m.__dict__ and "_hasten_hooks" not in m.__dict__ and hooks_of(m) is None
    assert m.forward.__func__ is AddOne.forward
    assert dict(m.named_buffers()) == buffers and all(buffers[k] is v for k, v in m.named_buffers())
    assert torch.equal(m(x), x + 1)


def test_names_are_unique_and_refused_by_name():
    m = AddOne()
    handle = add_hook(m, "cache", plus(1))
    with pytest.raises(ValueError, match="already has a hook named 'cache'"):
        add_hook(m, "cache", plus(2))
    with pytest.raises(ValueError, match=r"no hook named 'quant'; it has: \['cache'\]"):
        remove_hook(m, "quant")
    with pytest.raises(ValueError, match="non-empty string"):
        add_hook(m, "", plus(1))
    with pytest.raises(TypeError, match="must be callable"):
        add_hook(m, "x", 3)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        add_hook(object(), "x", plus(1))
    assert get_hook(m, "cache") is handle.hook and get_hook(m, "quant") is None
    handle.remove()
    with pytest.raises(RuntimeError, match="already removed"):
        handle.remove()
    with pytest.raises(ValueError, match=r"no hook named 'cache'; it has: \[\]"):
        remove_hook(m, "cache")


def test_a_failed_removal_of_several_changes_nothing():
    m, other = AddOne(), AddOne()
    first = add_hook(m, "a", plus(1))
    gone = add_hook(other, "b", plus(1))
    gone.remove()
    with pytest.raises(RuntimeError, match="already removed"):
        remove_hooks([first, gone])
    assert first.active and torch.equal(m(torch.zeros(1)), torch.full((1,), 2.0))


class RunCounter:
    """A stateful hook: counts calls per run; ``new_run`` clears the count."""

    def __init__(self) -> None:
        self.calls, self.new_runs = 0, 0

    def __call__(self, forward, *args):
        self.calls += 1
        return forward(*args)

    def new_run(self) -> None:
        self.calls, self.new_runs = 0, self.new_runs + 1


class ZeroEps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        return x * self.scale


def test_state_is_reset_once_per_sampling_run():
    net = ZeroEps()
    counter = RunCounter()
    add_hook(net, "count", counter)
    x, t = torch.zeros(1, 1), torch.zeros(1)
    net(x, t), net(x, t)  # outside any run: no reset, state persists
    assert (counter.calls, counter.new_runs) == (2, 0)
    with sampling_run():
        net(x, t), net(x, t), net(x, t)
        assert (counter.calls, counter.new_runs) == (3, 1)
    with sampling_run():
        net(x, t)
        assert (counter.calls, counter.new_runs) == (1, 2)
    # through the sample loop: one reset per call of hasten.sample
    schedule = hasten.schedules.VPDiscrete.from_betas()
    sigmas = hasten.get_sigmas("karras", 4, schedule)
    hasten.sample(hasten.models.EpsDenoiser(net, schedule), torch.randn(2, 1) * sigmas[0], sigmas, "euler")
    assert (counter.calls, counter.new_runs) == (4, 3)


def test_a_patch_made_before_is_wrapped_and_put_back():
    m = AddOne()

    def theirs(x):  # another library's forward in the instance dict
        return AddOne.forward(m, x) * 100

    m.forward = theirs
    handle = add_hook(m, "ours", plus(1))
    assert torch.equal(m(torch.zeros(1)), torch.full((1,), 101.0))
    handle.remove()
    assert m.__dict__["forward"] is theirs and hooks_of(m) is None


def test_a_patch_made_after_keeps_our_hooks_and_blocks_only_the_last_removal():
    m = AddOne()
    a = add_hook(m, "a", plus(1))
    ours = m.__dict__["forward"]
    saved = m.forward

    def theirs(x):
        return saved(x) * 100

    m.forward = theirs  # e.g. DeepCache's enable() saving and wrapping the current forward
    b = add_hook(m, "b", times(2))
    assert torch.equal(m(torch.zeros(1)), torch.full((1,), 400.0))  # theirs(((0 + 1) + 1) * 2)
    a.remove()  # not the last one: fine
    with pytest.raises(RuntimeError, match=r"replaced by .*theirs.*; remove that patch first"):
        b.remove()
    assert b.active and m.__dict__["forward"] is theirs
    m.forward = saved  # they restore what they saved: our dispatcher
    assert m.__dict__["forward"] is ours
    b.remove()
    assert forward_attributes(m) == {}


def test_coexists_with_diffusers_hook_registry_removed_first():
    from diffusers.hooks import HookRegistry, ModelHook

    class Triple(ModelHook):
        def post_forward(self, module, output):
            return output * 3

    m = AddOne()
    handle = add_hook(m, "ours", plus(1))
    theirs = HookRegistry.check_if_exists_or_initialize(m)
    theirs.register_hook(Triple(), "triple")
    assert torch.equal(m(torch.zeros(1)), torch.full((1,), 6.0))  # theirs around ours
    theirs.remove_hook("triple")
    handle.remove()
    assert "forward" not in m.__dict__ and hooks_of(m) is None
    assert torch.equal(m(torch.zeros(1)), torch.ones(1))


def test_a_deep_copy_gets_its_own_hooks():
    m = AddOne()
    counter = RunCounter()
    add_hook(m, "count", counter)
    twin = copy.deepcopy(m)
    twin(torch.zeros(1))
    assert counter.calls == 0 and get_hook(twin, "count").calls == 1
    remove_hook(twin, "count")
    assert forward_attributes(twin) == {} and get_hook(m, "count") is counter


# -- a cache and quantisation on one network --------------------------------------------------------


def run(net, steps=9):
    schedule = hasten.schedules.VPDiscrete.from_betas()
    sigmas = hasten.get_sigmas("karras", steps, schedule)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    den = hasten.models.EpsDenoiser(net, schedule)
    return hasten.sample(den, x, sigmas, "dpmpp_2m", cond={"class_labels": torch.tensor([0, 1])})


@pytest.mark.parametrize("first_off", ["cache", "time"])
def test_cache_and_time_hook_compose_and_come_off_in_either_order(first_off):
    net = tiny_unet()
    before = forward_attributes(net)
    reference = run(net)
    seen = []
    probe = net.get_submodule("conv_in").register_forward_pre_hook(lambda m, a: seen.append(modules._TIME.get()))
    time_handle = publish_network_time(net)
    acc = accelerate_(net, DeepCacheConfig(interval=3))
    assert hooks_of(net).names == (TIME_HOOK, "hasten.accel") and accelerator_of(net) is acc
    cached = run(net)
    assert acc.stats.reused > 0 and not torch.equal(cached, reference)
    assert len(seen) == 9 and all(t is not None for t in seen)  # the time hook ran inside the cached network
    if first_off == "cache":
        acc.remove()
        assert hooks_of(net).names == (TIME_HOOK,) and accelerator_of(net) is None
        assert torch.equal(run(net), reference)
        time_handle.remove()
    else:
        time_handle.remove()  # the inner hook: the cache keeps working around the module alone
        seen.clear()
        assert torch.equal(run(net), cached) and acc.stats.reused > 0 and seen == [None] * 9
        assert accelerator_of(net) is acc
        acc.remove()
    probe.remove()
    assert forward_attributes(net) == before and hooked_modules(net) == {}
    assert torch.equal(run(net), reference)


@pytest.mark.parametrize("quant_hook", [False, True])
def test_the_deepcache_peer_gets_the_step_from_a_hook_and_leaves_no_trace(quant_hook):
    pytest.importorskip("DeepCache")
    from hasten.bench.cache_peers import peer_cache

    net = tiny_unet()
    before = forward_attributes(net)
    reference = run(net)
    handle = publish_network_time(net) if quant_hook else None
    during = forward_attributes(net)
    with peer_cache("deepcache", net, 9):
        assert hooks_of(net).names == ((TIME_HOOK,) if quant_hook else ()) + ("hasten.bench.deepcache_step",)
        cached = run(net)
    assert not torch.equal(cached, reference)  # reuse needs the loop's step: the package alone would see step 0
    assert forward_attributes(net) == during
    if handle is not None:
        handle.remove()
    assert forward_attributes(net) == before and torch.equal(run(net), reference)


@pytest.fixture(scope="module")
def mnist_unet_calibration():
    model = hasten.load("mnist-unet")
    return collect_calibration(model, n=MIN_SAMPLES, steps=6)


def test_quantize_refuses_a_hooked_network(mnist_unet_calibration):
    model = hasten.load("mnist-unet")
    with accelerate_(model, DeepCacheConfig(interval=3)), pytest.raises(ValueError, match="carries hooks"):
        quantize_(model, QuantConfig(), calibration=mnist_unet_calibration)
    assert not any(isinstance(m, QuantizedLayer) for m in model.network.modules())


def test_quantised_layers_and_a_cache_in_one_sampling_run(mnist_unet_calibration):
    """The issue's acceptance test. ``quantize_`` has no undo (it replaces layers), so what comes off is its
    time hook: the network ends as ``quantize_`` left it minus the hook, checked call for call."""
    model = hasten.load("mnist-unet")
    net = model.network
    before = forward_attributes(net)

    def generate():
        return hasten.generate(model, 4, steps=10, seed=0).samples

    float_out = generate()
    float_cached = hasten.generate(model, 4, steps=10, seed=0, accel=DeepCacheConfig(interval=3)).samples
    quantize_(model, QuantConfig(weights=8, activations=8), calibration=mnist_unet_calibration)
    assert hooks_of(net).names == (TIME_HOOK,)
    quant_out = generate()
    x, t, labels = torch.randn(2, 1, 28, 28), torch.tensor([500.0, 500.0]), torch.tensor([1, 2])
    with torch.no_grad():
        hooked_call = net(x, t, class_labels=labels).sample

    layers = [m for m in net.modules() if isinstance(m, QuantizedLayer)]
    calls, times_seen = [0], set()

    def count(m, args):
        calls[0] += 1
        times_seen.add(modules._TIME.get())

    probes = [layer.register_forward_pre_hook(count) for layer in layers]
    generate()
    uncached_layer_calls = calls[0]
    for cache_added_first in (False, True):  # the cache outside the time hook, then inside it
        if cache_added_first:
            remove_hook(net, TIME_HOOK)
            acc = accelerate_(model, DeepCacheConfig(interval=3))
            publish_network_time(net)
            assert hooks_of(net).names == ("hasten.accel", TIME_HOOK)
        else:
            acc = accelerate_(model, DeepCacheConfig(interval=3))
            assert hooks_of(net).names == (TIME_HOOK, "hasten.accel")
        calls[0] = 0
        times_seen.clear()
        both = generate()
        assert acc.stats.reused > 0 and acc.stats.nfe_saved > 0  # the cache reused features
        assert 0 < calls[0] < uncached_layer_calls  # quantised layers ran, fewer of them: deep ones were cached
        assert None not in times_seen and len(times_seen) == 10  # with the time of every step
        for other in (float_out, float_cached, quant_out):
            assert not torch.equal(both, other)
        if cache_added_first:
            both_again = both
        else:
            both_first = both
            acc.remove()
            assert torch.equal(generate(), quant_out) and hooks_of(net).names == (TIME_HOOK,)
    assert torch.equal(both_again, both_first)  # the order of the two hooks does not change the result
    remove_hook(net, TIME_HOOK)  # the time hook first this time: the cache keeps running without it
    acc.reset()
    generate()
    assert acc.stats.reused > 0 and accelerator_of(model) is acc
    acc.remove()
    for probe in probes:
        probe.remove()
    assert forward_attributes(net) == before and hooked_modules(net) == {}
    with torch.no_grad():
        assert not torch.equal(net(x, t, class_labels=labels).sample, hooked_call)  # no time: row 0 ranges
        with network_time(500.0):  # what the hook did, declared by hand: the same call
            assert torch.equal(net(x, t, class_labels=labels).sample, hooked_call)
