"""The student model (kdcache.student.model)."""

import torch


def test_the_students_batchnorm_keeps_a_running_average_not_the_last_batch():
    from kdcache.student.model import BATCHNORM_MOMENTUM, build_student

    student = build_student(None, ["a", "b", "c"], (3, 32, 32), seed=0)
    norms = [module for module in student.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert norms and all(norm.momentum == BATCHNORM_MOMENTUM for norm in norms)
    batch_means = []
    norms[0].register_forward_hook(lambda module, inputs, output: batch_means.append(inputs[0].mean((0, 2, 3))))
    student.train()
    with torch.no_grad():  # two batches with very different statistics: the running mean must remember the first
        student(pixel_values=torch.zeros(4, 3, 32, 32))
        student(pixel_values=torch.full((4, 3, 32, 32), 5.0))
    assert not torch.allclose(norms[0].running_mean, batch_means[-1], atol=1e-3)
    # from zeros: m * first, then (1 - m) * that + m * second
    expected = (1 - BATCHNORM_MOMENTUM) * BATCHNORM_MOMENTUM * batch_means[0] + BATCHNORM_MOMENTUM * batch_means[1]
    assert torch.allclose(norms[0].running_mean, expected, atol=1e-5)
