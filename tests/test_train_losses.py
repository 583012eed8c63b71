from __future__ import annotations

import math

import pytest
import torch

from rtfq_deploy.train.losses import (LossWeights, distillation, information_maximization, pseudo_label_loss,
                                      pseudo_labels)


def test_distillation_is_kl_of_softmaxes_by_hand():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax = (3/4, 1/4)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert distillation(student, teacher).item() == pytest.approx(expected, abs=1e-6)
    assert distillation(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_temperature_scales_by_t_squared():
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[2 * math.log(3.0), 0.0]])
    # at T=2 the teacher is again (3/4, 1/4); the loss is multiplied by T^2 = 4
    expected = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert distillation(student, teacher, 2.0).item() == pytest.approx(expected, abs=1e-6)


def test_distillation_sends_no_gradient_to_the_teacher():
    teacher = torch.tensor([[1.0, 0.0]], requires_grad=True)
    student = torch.tensor([[0.0, 1.0]], requires_grad=True)
    distillation(student, teacher).backward()
    assert teacher.grad is None and student.grad is not None


def test_pseudo_labels_keep_only_confident_predictions():
    logits = torch.tensor([[4.0, 0.0], [0.1, 0.0], [0.0, 5.0]])
    labels, mask = pseudo_labels(logits, threshold=0.9)
    assert labels.tolist() == [0, 0, 1]
    assert mask.tolist() == [True, False, True]  # softmax(4,0)=0.982, (0.1,0)=0.525, (0,5)=0.993


def test_pseudo_label_loss_averages_over_the_whole_batch():
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    loss = pseudo_label_loss(logits, torch.tensor([0, 1]), torch.tensor([True, False]))
    assert loss.item() == pytest.approx(math.log(2) / 2)
    none = pseudo_label_loss(logits.requires_grad_(), torch.tensor([0, 1]), torch.tensor([False, False]))
    assert none.item() == 0.0
    none.backward()  # still part of the graph, with zero gradient
    assert torch.count_nonzero(logits.grad) == 0


def test_information_maximization_by_hand():
    k = 4
    uniform = torch.zeros(3, k)  # every prediction uniform: entropy log K, diversity log K
    assert information_maximization(uniform).item() == pytest.approx(0.0, abs=1e-6)
    confident_diverse = torch.eye(k) * 50  # one-hot on different classes: entropy 0, diversity log K
    assert information_maximization(confident_diverse).item() == pytest.approx(-math.log(k), abs=1e-5)
    collapsed = torch.tensor([[50.0, 0, 0, 0]] * k)  # confident but all the same class: 0 - 0
    assert information_maximization(collapsed).item() == pytest.approx(0.0, abs=1e-5)


def test_loss_weights_validate():
    assert not LossWeights(distill=0, pseudo=0, im=0).uses_target
    with pytest.raises(ValueError):
        LossWeights(im=-1)
    with pytest.raises(ValueError):
        LossWeights(threshold=1.5)
