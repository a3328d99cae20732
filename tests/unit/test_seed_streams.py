"""Training's random streams (epoch, data order, each face) are seeded apart."""


def test_the_epochs_streams_are_apart_for_every_purpose_rank_and_face():
    """SeedSequence pads with zeros: (seed, e) and (seed, e, 0) were one seed, so rank 0's dropout stream was the data
    order's and face 0's augmentation's, and under torchrun rank r's was face r's."""
    import torch

    from faceage.training import EPOCH_STREAM, ORDER_STREAM, SAMPLE_STREAM, EpochSampler, SeededSamples, _mix, seed_epoch

    seeds = {_mix(EPOCH_STREAM, 42, 3, r) for r in range(4)} | {_mix(ORDER_STREAM, 42, 3)} | {
        _mix(SAMPLE_STREAM, 42, 3, i) for i in range(4)}
    assert len(seeds) == 9
    assert _mix(SAMPLE_STREAM, 42, 3) != _mix(SAMPLE_STREAM, 42, 3, 0)
    # What the streams draw: rank 0's global stream after seed_epoch, the sampler's order, face 0's draw.
    seed_epoch(42, 3, 0)
    dropout = torch.rand(8)
    sampler = EpochSampler(range(8), 1, 0, shuffle=True, seed=42)
    sampler.set_epoch(3)
    order_gen = torch.Generator().manual_seed(_mix(ORDER_STREAM, 42, 3))
    assert [i for i, _ in sampler] == torch.randperm(8, generator=order_gen).tolist()
    samples = SeededSamples([(torch.rand(8), torch.tensor(30.0), torch.tensor(0.0))], 42, False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_mix(SAMPLE_STREAM, 42, 3, 0))
        face0 = torch.rand(8)
    assert not torch.equal(dropout, face0)
    assert not torch.equal(dropout, torch.rand(8, generator=torch.Generator().manual_seed(_mix(ORDER_STREAM, 42, 3))))
    assert samples[(0, 3)][1] == 30.0
    torch.manual_seed(42)
