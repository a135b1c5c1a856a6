"""``nnUNetv2_train -pretrained_weights`` with a plain nnU-Net checkpoint for networks around the plan's U-Net."""
import json

import pytest
import torch

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ext.training.dpcnet import nnUNetTrainerDPCNet
from nnunet_ext.training.godc_lfam import nnUNetTrainerLFAMGODC
from nnunet_ext.training.pretrained import load_pretrained_weights
from tests.conftest import DEMO_DATASET_ID, nnunet_command
from tests.tiny_plans import tiny_plans


def demo_network(demo_run, trainer_class):
    plans = PlansManager(json.loads((demo_run.model_folder("nnUNetTrainer_quick") / "plans.json").read_text()))
    return trainer_class.build_network_architecture(plans, plans.get_configuration("3d_fullres"), 1, 3, True)


@pytest.mark.parametrize("trainer_class", [nnUNetTrainerDPCNet, nnUNetTrainerLFAMGODC])
def test_shared_weights_equal_the_checkpoint_and_new_modules_are_listed(demo_run, plain_checkpoint, trainer_class):
    network = demo_network(demo_run, trainer_class)
    own_modules = {k: v.clone() for k, v in network.state_dict().items() if not k.startswith(("encoder.", "decoder."))}
    messages = []
    load_pretrained_weights(network, str(plain_checkpoint), log=messages.append)
    checkpoint = torch.load(plain_checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    state = network.state_dict()
    shared = [k for k in network.plan_network_keys() if ".seg_layers." not in k]
    assert shared and all(torch.equal(state[k], checkpoint[k]) for k in shared)
    assert all(torch.equal(state[k], v) for k, v in own_modules.items())  # the method's modules keep their init
    new = {k.split(".")[0] for k in own_modules}
    assert len(messages) == 1 and all(m in messages[0] for m in new) and f"(the plan's U-Net: {len(shared)})" in \
        messages[0]


def test_a_checkpoint_of_another_plan_is_a_clear_error(plain_checkpoint):
    plans = PlansManager(tiny_plans())
    network = nnUNetTrainerDPCNet.build_network_architecture(plans, plans.get_configuration("3d_fullres"), 1, 3, True)
    with pytest.raises(RuntimeError, match="another plan or configuration"):
        load_pretrained_weights(network, str(plain_checkpoint))


def test_fine_tuning_dpcnet_from_a_plain_checkpoint_with_the_real_command(demo_run, plain_checkpoint, tmp_path):
    env_results = tmp_path / "results"
    result = demo_run.run_with({"nnUNet_results": str(env_results)}, nnunet_command("nnUNetv2_train"),
                               DEMO_DATASET_ID, "3d_fullres", 0, "-tr", "nnUNetTrainerDPCNet_quick", "-device", "cpu",
                               "-pretrained_weights", plain_checkpoint)
    assert "Pretrained weights from" in result.stdout and "spacor" in result.stdout
    fold = next(env_results.glob("*/nnUNetTrainerDPCNet_quick__nnUNetPlans__3d_fullres/fold_0"))
    assert (fold / "checkpoint_final.pth").is_file()
