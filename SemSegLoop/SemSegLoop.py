"""SemSegLoop Slicer module: paint a few strokes per class, train a UNet in the background, get a
prediction segmentation, correct it, train again. The engine (``semsegloop``) lives in Logic/.

Module / Widget / Logic / Test as in Slicer's scripted-module template. The widget only binds the
panel to the parameter node and calls logic methods; the logic takes and returns MRML nodes and is
usable from the Python console. Training and prediction run in the engine service, a child
process (PythonSlicer running `semsegloop serve`) started with qt.QProcess when a project opens;
its events are read on the main thread, and no Python thread computes inside Slicer.
"""

import enum
import logging
import os
import pathlib
from typing import Annotated, Union

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLVectorVolumeNode


def _importEngine(moduleDir=None):
    """Import the engine as ``semsegloop`` from this module's own Logic/ folder.

    Only the package name ``semsegloop`` is registered (in sys.modules); Logic/ itself never goes
    on sys.path, so no generic name such as ``Logic`` can shadow another extension's. An engine
    already imported (e.g. an editable pip install of this repository) is reused, since one
    process cannot hold two. Importing it is light: torch and MONAI load on first training.
    """
    import importlib.util
    import sys

    loaded = sys.modules.get("semsegloop")
    if loaded is not None:
        return loaded
    moduleDir = moduleDir or os.path.dirname(os.path.abspath(__file__))
    logicDir = os.path.join(moduleDir, "Logic")
    spec = importlib.util.spec_from_file_location(
        "semsegloop", os.path.join(logicDir, "__init__.py"), submodule_search_locations=[logicDir])
    module = importlib.util.module_from_spec(spec)
    sys.modules["semsegloop"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["semsegloop"]
        raise
    return module


semsegloop = _importEngine()
from semsegloop.slicer import panel as session  # noqa: E402  (needs the engine registered first)

IMAGE_ID_ATTRIBUTE = "SemSegLoop.imageId"
PROJECT_ATTRIBUTE = "SemSegLoop.project"
LABELS_REFERENCE_ROLE = "SemSegLoopLabels"
PAINT_EFFECTS = ["Paint", "Erase", "Draw", "Threshold", "Smoothing"]


#
# SemSegLoop
#


class SemSegLoop(ScriptedLoadableModule):
    """Module metadata; see Slicer's ScriptedLoadableModule base class."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SemSegLoop")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "SegmentEditor"]
        self.parent.contributors = ["SemSegLoop contributors"]
        self.parent.helpText = _("""
Human-in-the-loop semantic segmentation: name your classes, paint a few strokes of each, press
Train. A UNet learns from the strokes in the background while you keep working; its prediction
appears as a "SemSegLoop round N" segmentation. Copy what is right into your labels, fix what is
wrong, and train again. Refine corrects the prediction from your new strokes in about a second,
without training; Suggest lists the images or slices the model is least sure about.
""")
        self.parent.acknowledgementText = _("""
Built on 3D Slicer, MONAI and PyTorch.
""")


#
# Parameter node
#


class Dims(enum.Enum):
    AUTO = "auto"
    TWO_D = "2D"
    THREE_D = "3D"

    def label(self):
        return {"auto": _("Auto"), "2D": _("2D (slice by slice)"), "3D": _("3D")}[self.value]


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    GPU = "cuda"

    def label(self):
        return {"auto": _("Auto (GPU if available)"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}[self.value]


class ExportFormat(enum.Enum):
    NRRD = "nrrd"
    TIFF = "tiff"

    def label(self):
        return {"nrrd": _("NRRD"), "tiff": _("TIFF (2D stacks)")}[self.value]


@parameterNodeWrapper
class SemSegLoopParameterNode:
    """The panel's state, saved with the scene.

    classNames / classColors: the classes in label order (label k = k-th), colours as #rrggbb.
    steps: 0 means "train for timeBudgetS seconds".
    """

    # Both classes, so connectGui keeps RGB (vector) volumes selectable: with child types hidden a
    # scalar-only selector filters vtkMRMLVectorVolumeNode out (and would show label maps if not).
    inputVolume: Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode]
    imageFolder: pathlib.Path
    dims: Dims = Dims.AUTO
    projectFolder: pathlib.Path
    classNames: list[str]
    classColors: list[str]
    preset: str = ""
    timeBudgetS: Annotated[int, WithinRange(1, 86400)] = 60
    steps: Annotated[int, WithinRange(0, 1000000)] = 0
    device: Device = Device.AUTO
    autoPredict: bool = True
    showUncertainty: bool = False
    predictionSegmentation: vtkMRMLSegmentationNode
    selectedClassesOnly: bool = False
    exportFolder: pathlib.Path
    exportFormat: ExportFormat = ExportFormat.NRRD
    referenceSegmentation: vtkMRMLSegmentationNode


#
# SemSegLoopWidget
#


class SemSegLoopWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: each button calls one logic method; see the module docstring."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._segmentEditorNode = None
        self._stopping = False
        self._updatingClassTable = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SemSegLoop.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SemSegLoopLogic()

        self._setupSegmentEditor()
        # The engine's events arrive on the main thread (the process's output signal).
        self.logic.addJobObservers(self.onJobProgress, self.onJobFinished)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.loadFolderButton.connect("clicked(bool)", self.onLoadFolderButton)
        self.ui.openProjectButton.connect("clicked(bool)", self.onOpenProjectButton)
        self.ui.addClassButton.connect("clicked(bool)", self.onAddClassButton)
        self.ui.removeClassButton.connect("clicked(bool)", self.onRemoveClassButton)
        self.ui.classesTableWidget.connect("cellChanged(int,int)", self.onClassCellChanged)
        self.ui.classesTableWidget.connect("cellDoubleClicked(int,int)", self.onClassCellDoubleClicked)
        self.ui.presetComboBox.connect("currentIndexChanged(int)", self.onPresetChanged)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.predictButton.connect("clicked(bool)", self.onPredictButton)
        self.ui.acceptCorrectionsButton.connect("clicked(bool)", self.onAcceptCorrectionsButton)
        self.ui.predictAllButton.connect("clicked(bool)", self.onPredictAllButton)
        self.ui.refineButton.connect("clicked(bool)", self.onRefineButton)
        self.ui.postClassComboBox.connect("currentIndexChanged(int)", self.onPostClassChanged)
        self.ui.applyPostprocessButton.connect("clicked(bool)", self.onApplyPostprocessButton)
        self.ui.suggestButton.connect("clicked(bool)", self.onSuggestButton)
        self.ui.suggestListWidget.connect("itemClicked(QListWidgetItem*)", self.onSuggestionClicked)
        self._suggestions = []
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.fractionsButton.connect("clicked(bool)", self.onFractionsButton)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)

        self.initializeParameterNode()

    # ---------------------------------------------------------------- Segment Editor lifecycle
    # Follows the core Segment Editor module so both share one singleton parameter node and
    # never fight over a segmentation.

    def _setupSegmentEditor(self) -> None:
        editor = self.ui.segmentEditorWidget
        editor.setMaximumNumberOfUndoStates(10)
        self._selectSegmentEditorNode()  # before the scene, so automatic selections are saved
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setSegmentationNodeSelectorVisible(False)
        editor.setSourceVolumeNodeSelectorVisible(False)
        editor.setSwitchToSegmentationsButtonVisible(False)
        editor.unorderedEffectsVisible = False
        editor.setEffectNameOrder(PAINT_EFFECTS)
        # Effects registered after this widget exists (e.g. by extensions) must still appear.
        self._effectFactory = slicer.qSlicerSegmentEditorEffectFactory.instance()
        self._effectFactory.connect("effectRegistered(QString)", self.onEffectRegistered)

    def onEffectRegistered(self) -> None:
        self.ui.segmentEditorWidget.updateEffectList()

    def _selectSegmentEditorNode(self) -> None:
        node = slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag("SegmentEditor")
            node = slicer.mrmlScene.AddNode(node)
        if node != self._segmentEditorNode:
            self._segmentEditorNode = node
            self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(node)

    def _bindEditor(self, volumeNode) -> None:
        """Point the editor at the current volume and its labels segmentation."""
        editor = self.ui.segmentEditorWidget
        if volumeNode is None:
            editor.setSegmentationNode(None)
            return
        seg = self.logic.labelsSegmentation(volumeNode, self._classes())
        editor.setSegmentationNode(seg)
        editor.setSourceVolumeNode(volumeNode)

    def cleanup(self) -> None:
        # Called when the application closes (or the module is reloaded): the engine stops.
        if self.logic is not None:
            self.logic.removeJobObservers(self.onJobProgress, self.onJobFinished)
            self.logic.shutdown()
        self.removeObservers()
        self._effectFactory.disconnect("effectRegistered(QString)", self.onEffectRegistered)

    def enter(self) -> None:
        self.initializeParameterNode()
        self.ui.segmentEditorWidget.installKeyboardShortcuts()
        self._selectSegmentEditorNode()
        self.ui.segmentEditorWidget.updateWidgetFromMRML()
        if self._parameterNode and self._parameterNode.inputVolume:
            with slicer.util.tryWithErrorDisplay(_("Could not prepare the labels segmentation.")):
                self._bindEditor(self._parameterNode.inputVolume)

    def exit(self) -> None:
        editor = self.ui.segmentEditorWidget
        editor.setActiveEffect(None)
        editor.uninstallKeyboardShortcuts()
        editor.removeViewObservations()
        # A running job goes on in the engine process; the panel shows it again on return.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.onSceneClose()  # cancels a running job; its result will not be imported
        self._segmentEditorNode = None
        self.ui.segmentEditorWidget.setSegmentationNode(None)
        self.ui.segmentEditorWidget.removeViewObservations()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self._selectSegmentEditorNode()
            self.ui.segmentEditorWidget.updateWidgetFromMRML()
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        # As the core Segment Editor: an imported scene may bring its own editor node.
        if self.parent.isEntered:
            self._selectSegmentEditorNode()
            self.ui.segmentEditorWidget.updateWidgetFromMRML()
            self.initializeParameterNode()

    # ---------------------------------------------------------------- parameter node

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.classNames:
            names = list(session.DEFAULT_CLASSES)
            self._storeClasses(names, [session.hex_color(session.default_color(i)) for i in range(len(names))])
        if not p.inputVolume:
            from semsegloop.slicer import predictions
            p.inputVolume = predictions.first_image_volume(slicer.mrmlScene)  # never a label map

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """The parts connectGui cannot bind: the class table, presets, button states."""
        if not self._parameterNode:
            return
        self._fillClassTable()
        self._fillPresets()
        self._fillPostprocessing()
        self._updateButtons()
        self.ui.projectStatusLabel.text = self.logic.projectSummary()

    def _storeClasses(self, names, colors) -> None:
        # One Modified event for both lists, so the table never sees names and colours disagree.
        with slicer.util.NodeModify(self._parameterNode.parameterNode):
            self._parameterNode.classNames = list(names)
            self._parameterNode.classColors = list(colors)

    def _classes(self) -> list:
        p = self._parameterNode
        return session.make_classes(p.classNames, p.classColors)

    def _fillClassTable(self) -> None:
        table = self.ui.classesTableWidget
        names, colors = list(self._parameterNode.classNames), list(self._parameterNode.classColors)
        shown = [(table.item(r, 0).text() if table.item(r, 0) else None,
                  table.item(r, 1).background().color().name() if table.item(r, 1) else None)
                 for r in range(table.rowCount)]
        if shown == list(zip(names, colors)):
            return  # rebuilding would lose the selection used by "Only classes selected"
        self._updatingClassTable = True
        try:
            table.setRowCount(len(names))
            for row, name in enumerate(names):
                table.setItem(row, 0, qt.QTableWidgetItem(name))
                swatch = qt.QTableWidgetItem("")
                swatch.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
                swatch.setBackground(qt.QBrush(qt.QColor(colors[row] if row < len(colors) else "#808080")))
                swatch.setToolTip(_("Double-click to change the colour"))
                table.setItem(row, 1, swatch)
        finally:
            self._updatingClassTable = False

    def _fillPresets(self) -> None:
        combo = self.ui.presetComboBox
        presets = self.logic.availablePresets(self.logic.projectDims())
        if [combo.itemText(i) for i in range(combo.count)] != list(presets):
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            for i, (name, description) in enumerate(presets.items()):
                combo.addItem(name)
                combo.setItemData(i, description, qt.Qt.ToolTipRole)
            combo.blockSignals(wasBlocked)
        wanted = self._parameterNode.preset or self.logic.defaultPreset()
        if wanted in presets and combo.currentText != wanted:
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = combo.findText(wanted)
            combo.blockSignals(wasBlocked)

    def _updateButtons(self) -> None:
        state = session.train_button_state(self.logic.busyJob(), self._stopping)
        self.ui.trainButton.text = state.text
        self.ui.trainButton.enabled = state.enabled
        self.ui.trainButton.toolTip = state.tooltip
        idle = self.logic.busyJob() is None
        hasVolume = bool(self._parameterNode and self._parameterNode.inputVolume)
        for button in (self.ui.predictButton, self.ui.predictAllButton, self.ui.exportButton,
                       self.ui.fractionsButton, self.ui.compareButton):
            button.enabled = idle
        self.ui.predictButton.enabled = idle and hasVolume
        self.ui.refineButton.enabled = idle and hasVolume
        self.ui.suggestButton.enabled = idle
        self.ui.acceptCorrectionsButton.enabled = bool(hasVolume and self._parameterNode.predictionSegmentation)

    # ---------------------------------------------------------------- Input

    def onInputVolumeChanged(self, volumeNode) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not prepare the labels segmentation.")):
            self._bindEditor(volumeNode)

    def onLoadFolderButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not load the image folder."), waitCursor=True):
            volume = self.logic.loadImageFolder(self._parameterNode.imageFolder)
            self._parameterNode.inputVolume = volume

    def _project(self):
        """The project of the chosen folder, opened (or created) on first use; the panel then
        shows its classes, which win over unsaved edits in the table."""
        p = self._parameterNode
        project = self.logic.openOrCreateProject(p.projectFolder, p.classNames, p.classColors, p.dims.value, p.inputVolume)
        self._storeClasses(project.class_names, [session.hex_color(c["color"]) for c in project.classes])
        if not p.preset:
            p.preset = project.preset
        return project

    def onOpenProjectButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not open or create the project."), waitCursor=True):
            project = self._project()
            if not p.inputVolume and project.image_ids:
                p.inputVolume = self.logic.volumeForImage(project.image_ids[0])
            self._bindEditor(p.inputVolume)
            slicer.util.showStatusMessage(self.logic.projectSummary(), 5000)

    # ---------------------------------------------------------------- Classes

    def _setClasses(self, names, colors, removed=()) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not change the classes.")):
            try:
                self.logic.setClasses(names, colors, self._parameterNode.inputVolume, removed=removed)
                self._storeClasses(names, colors)
            finally:
                self._fillClassTable()  # shows the stored classes again if the edit was refused

    def onAddClassButton(self) -> None:
        names = list(self._parameterNode.classNames)
        colors = list(self._parameterNode.classColors)
        colors.append(session.hex_color(session.default_color(len(names))))
        names.append(session.new_class_name(names))
        self._setClasses(names, colors)

    def onRemoveClassButton(self) -> None:
        row = self.ui.classesTableWidget.currentRow()
        names = list(self._parameterNode.classNames)
        if not 0 <= row < len(names):
            slicer.util.showStatusMessage(_("Select the class to remove in the table."), 3000)
            return
        if not slicer.util.confirmOkCancelDisplay(
                _("Remove class '{name}' and its strokes?").format(name=names[row])):
            return
        colors = list(self._parameterNode.classColors)
        removed = names.pop(row)
        del colors[row]
        self._setClasses(names, colors, removed=[removed])

    def onClassCellChanged(self, row, column) -> None:
        if self._updatingClassTable or column != 0:
            return
        names = list(self._parameterNode.classNames)
        names[row] = self.ui.classesTableWidget.item(row, 0).text()
        self._setClasses(names, list(self._parameterNode.classColors))

    def onClassCellDoubleClicked(self, row, column) -> None:
        if column != 1:
            return
        colors = list(self._parameterNode.classColors)
        color = qt.QColorDialog.getColor(qt.QColor(colors[row]))
        if color.isValid():
            colors[row] = color.name()
            self._setClasses(list(self._parameterNode.classNames), colors)

    # ---------------------------------------------------------------- Train

    def onPresetChanged(self, index) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.preset = self.ui.presetComboBox.itemText(index)

    def onTrainButton(self) -> None:
        if self.logic.busyJob() == "train":
            self.logic.cancel()
            self._stopping = True
            self._updateButtons()
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Training could not start."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            self._project()
            self.logic.train(volumeNodes=[p.inputVolume] if p.inputVolume else None,
                             timeBudgetS=p.timeBudgetS, steps=p.steps, device=p.device.value,
                             preset=p.preset or None)
            self.logic.showLossPlot()
            self.ui.trainProgressBar.value = 0
            self._jobStarted()

    def _jobStarted(self) -> None:
        self._stopping = False
        self._updateButtons()

    def onJobProgress(self, progress) -> None:
        if not self._parameterNode:
            return
        self.ui.trainProgressBar.value = session.progress_percent(progress, self._parameterNode.timeBudgetS)
        self.ui.trainStatusLabel.text = session.progress_text(progress)

    def onJobFinished(self, job, outcome) -> None:
        """A job's final event was read (a job is over only then): show it, follow up."""
        self._stopping = False
        self._updateButtons()
        level, text, details = session.final_message(job)
        self.ui.trainStatusLabel.text = text
        if level == "error":
            slicer.util.errorDisplay(text, **({"detailedText": details} if details else {}))
        else:
            slicer.util.showStatusMessage(text, 5000)
        p = self._parameterNode
        if p is None:
            return
        if job.op == "train":
            self.ui.trainProgressBar.value = 100
            if session.predict_after_training(job, p.autoPredict, bool(p.inputVolume)):
                try:
                    self.onPredictButton()
                except Exception:  # already shown by tryWithErrorDisplay
                    logging.debug("automatic prediction did not start", exc_info=True)
        elif job.op == "predict" and outcome and p.inputVolume and p.inputVolume.GetID() in outcome:
            p.predictionSegmentation = outcome[p.inputVolume.GetID()]
        elif job.op == "refine" and outcome is not None:
            self.ui.refineStatusLabel.text = _("Refined: {n} voxels changed (shown in \"{name}\").").format(
                n=job.result.get("changed"), name=outcome.GetName())
        elif job.op == "suggest" and outcome is not None:
            self._showSuggestions(outcome)
        elif job.op in ("fractions", "evaluate") and outcome is not None:
            self.logic.showTable(outcome)
        elif job.op == "export" and outcome:
            self.ui.finishStatusLabel.text = _("Wrote {n} label maps to {folder}").format(
                n=len(outcome), folder=os.path.dirname(str(outcome[0])))

    # ---------------------------------------------------------------- Predict and Correct

    def onPredictButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Prediction could not start."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            self._project()
            self.logic.predict(p.inputVolume, showUncertainty=p.showUncertainty)
            self._jobStarted()

    def onAcceptCorrectionsButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not copy the prediction into the labels."), waitCursor=True):
            classes = None
            if p.selectedClassesOnly:
                rows = sorted({index.row() for index in self.ui.classesTableWidget.selectedIndexes()})
                if not rows:
                    raise ValueError(_("Select the classes to copy in the Classes table, or untick "
                                       "'Only classes selected in the table'."))
                classes = [row + 1 for row in rows]
            self._bindEditor(p.inputVolume)
            self.ui.segmentEditorWidget.saveStateForUndo()  # one Undo in Paint reverts the copy
            added = self.logic.acceptCorrections(p.inputVolume, p.predictionSegmentation, classes=classes)
            slicer.util.showStatusMessage(
                _("Copied {n} voxels of the prediction into the labels (Undo in Paint reverts).").format(
                    n=sum(added.values())), 5000)

    def onRefineButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Refine could not run."), waitCursor=True):
            self._project()
            self.logic.refine(p.inputVolume)
            self._jobStarted()

    def _fillPostprocessing(self) -> None:
        from semsegloop.slicer import corrections
        combo = self.ui.smoothingComboBox
        if combo.count == 0:
            for value, text in corrections.SMOOTHING_CHOICES:
                combo.addItem(text, value)
        names = list(self._parameterNode.classNames)
        classCombo = self.ui.postClassComboBox
        if [classCombo.itemText(i) for i in range(classCombo.count)] != names:
            wasBlocked = classCombo.blockSignals(True)
            classCombo.clear()
            classCombo.addItems(names)
            classCombo.blockSignals(wasBlocked)
            self.onPostClassChanged(classCombo.currentIndex)

    def onPostClassChanged(self, index) -> None:
        """Show the stored post-processing of the chosen class (the project holds it)."""
        from semsegloop.slicer import corrections
        settings = self.logic.postprocessingSettings()
        if index < 0 or settings is None:
            return
        form = corrections.postprocess_form(settings, index + 1)
        self.ui.largestComponentCheckBox.checked = form["largest_component"]
        self.ui.fillHolesCheckBox.checked = form["fill_holes"]
        self.ui.minSizeSpinBox.value = form["min_size"]
        self.ui.smoothingComboBox.currentIndex = max(0, self.ui.smoothingComboBox.findData(form["smoothing"]))
        self.ui.smoothingRadiusSpinBox.value = form["smoothing_mm"]
        self.ui.postprocessStatusLabel.text = corrections.postprocess_summary(settings, list(self._parameterNode.classNames))

    def onApplyPostprocessButton(self) -> None:
        from semsegloop.slicer import corrections
        with slicer.util.tryWithErrorDisplay(_("Could not store the post-processing."), waitCursor=True):
            project = self._project()
            form = {"largest_component": self.ui.largestComponentCheckBox.checked,
                    "fill_holes": self.ui.fillHolesCheckBox.checked,
                    "min_size": self.ui.minSizeSpinBox.value,
                    "smoothing": self.ui.smoothingComboBox.currentData,
                    "smoothing_mm": self.ui.smoothingRadiusSpinBox.value}
            settings = corrections.postprocess_update(project.postprocessing,
                                                      [self.ui.postClassComboBox.currentIndex + 1], form)
            stored = self.logic.setPostprocessing(settings)
            self.ui.postprocessStatusLabel.text = corrections.postprocess_summary(stored, project.class_names)

    def onSuggestButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Suggest could not run."), waitCursor=True):
            self._project()
            self.logic.suggest(3)
            self._jobStarted()

    def _showSuggestions(self, suggestions) -> None:
        self._suggestions = list(suggestions)
        self.ui.suggestListWidget.clear()
        for text in self.logic.suggestionTexts(self._suggestions):
            self.ui.suggestListWidget.addItem(text)

    def onSuggestionClicked(self, item) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not show the suggested image.")):
            row = self.ui.suggestListWidget.row(item)
            volume = self.logic.showSuggestion(self._suggestions[row])
            self._parameterNode.inputVolume = volume  # paint there next

    # ---------------------------------------------------------------- Finish

    def onPredictAllButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Prediction could not start."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            self._project()
            self.logic.predictAll(showUncertainty=self._parameterNode.showUncertainty)
            self._jobStarted()

    def onExportButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            self._project()
            self.logic.exportPredictions(p.exportFolder, p.exportFormat.value)
            self._jobStarted()

    def onFractionsButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not compute the class fractions."), waitCursor=True):
            self._project()
            self.logic.classFractions(self._parameterNode.exportFolder)
            self._jobStarted()

    def onCompareButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not compare with the reference."), waitCursor=True):
            self._project()
            self.logic.compareWithReference(p.inputVolume, p.referenceSegmentation)
            self._jobStarted()


#
# SemSegLoopLogic
#


class _EngineProcess:
    """The Qt side of the engine service: a qt.QProcess whose output signals feed the plain-Python
    client (semsegloop.service.client) on the main thread. Everything else is in the client."""

    def __init__(self, argv):
        self.argv = list(argv)
        self.process = None
        self._client = None
        self._exited = False

    @property
    def pid(self):
        return int(self.process.processId()) if self.process is not None else None

    def start(self, client) -> None:
        self._client = client
        process = qt.QProcess()
        process.connect("readyReadStandardOutput()", lambda: self._deliver(client.feed, process.readAllStandardOutput()))
        process.connect("readyReadStandardError()", lambda: self._deliver(client.feed_stderr, process.readAllStandardError()))
        process.connect("finished(int,QProcess::ExitStatus)", self._onFinished)
        process.connect("errorOccurred(QProcess::ProcessError)", self._onError)
        self.process = process
        process.start(self.argv[0], self.argv[1:])

    def _current(self) -> bool:
        # A killed process's late signals must not reach its successor's jobs.
        return self._client is not None and self._client.transport is self and not self._exited

    def _deliver(self, sink, data) -> None:
        if self._current():
            sink(bytes(data.data()))

    def _onFinished(self, exitCode, exitStatus) -> None:
        if self._current():
            self._client.feed(bytes(self.process.readAllStandardOutput().data()))
            self._exited = True
            self._client.process_exited(exitCode if exitStatus == qt.QProcess.NormalExit else None)

    def _onError(self, error) -> None:
        if error == qt.QProcess.FailedToStart and self._current():
            self._client.feed_stderr(f"error: cannot start {self.argv[0]}: {self.process.errorString()}\n".encode())
            self._exited = True
            self._client.process_exited(None)

    def write(self, data: bytes) -> None:
        self.process.write(data)

    def close_input(self) -> None:
        self.process.closeWriteChannel()

    def pump(self, timeout: float) -> None:
        """For blocking waits (console, self-test): output arrives through the signals meanwhile."""
        if self.process.state() == qt.QProcess.NotRunning:
            self._onFinished(self.process.exitCode(), self.process.exitStatus())
        else:
            self.process.waitForReadyRead(max(1, int(timeout * 1000)))

    def kill(self) -> None:
        from semsegloop.service.client import kill_process_tree
        if self.process.state() != qt.QProcess.NotRunning:
            kill_process_tree(self.pid)
            self.process.waitForFinished(10000)


class _SharedEngine:
    """One engine session per Slicer process, shared by every logic instance (widget and console),
    so two trainings can never run at once and the model stays warm in one service."""

    session = None
    plot = None                 # the scene's LossPlot
    progressObservers = []
    finishedObservers = []
    finished = []               # (job, outcome) since the last pollEvents()

    @classmethod
    def get(cls):
        if cls.session is None:
            from semsegloop.slicer.engine import EngineSession, engine_python
            cls.session = EngineSession(transport_factory=_EngineProcess,
                                        python=engine_python(slicer_home=slicer.app.slicerHome),
                                        engine_dir=os.path.dirname(semsegloop.__file__))
            cls.session.listeners.append(cls._onFinished)
        return cls.session

    @classmethod
    def _onFinished(cls, job, outcome):
        cls.finished = (cls.finished + [(job, outcome)])[-100:]
        for observer in list(cls.finishedObservers):
            observer(job, outcome)


class SemSegLoopLogic(ScriptedLoadableModuleLogic):
    """The workflow as node-in/node-out methods, usable from the Python console::

        logic = SemSegLoopLogic()
        logic.openOrCreateProject("/data/myproject", ["cell", "background"], volumeNode=volume)
        ... paint in the "<volume> labels" segmentation ...
        logic.train(timeBudgetS=60, wait=True)
        segmentation = logic.predict(volume, wait=True)

    Every method runs on the main thread. Long work (training, prediction, export) runs in the
    engine service, the project's one writer; ``self.project`` is a read-only view of it. With
    ``wait=False`` a method returns at once and the result arrives through the observers (the
    panel) or :meth:`pollEvents`; with ``wait=True`` it blocks and returns the result, raising
    the job's error (e.g. LabelError) on failure.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.project = None

    def getParameterNode(self):
        return SemSegLoopParameterNode(super().getParameterNode())

    # ---------------------------------------------------------------- project and images

    def openOrCreateProject(self, folder, classNames=None, classColors=None, dims="auto", volumeNode=None, preset=None):
        """Open the project in ``folder`` (its images come into the scene) or create one there
        with these classes; ``volumeNode``, if given, is added to it. The engine service starts
        for it. Returns the (read-only) Project."""
        state = session.project_folder_state(folder)
        if state == "unset":
            raise semsegloop.ProjectError(_("Choose a project folder in Input first: labels, models and "
                                            "predictions are kept there."))
        folder = pathlib.Path(folder).resolve()
        if self.project is not None and self.project.path.resolve() == folder:
            pass
        elif state == "project":
            self._openProject(folder)
            self.loadProjectIntoScene()
        elif state == "other":
            raise semsegloop.ProjectError(_("Folder '{folder}' is not empty and holds no SemSegLoop project; "
                                            "choose an empty folder or an existing project.").format(folder=folder))
        else:
            from semsegloop.slicer import mrml_bridge
            classes = session.make_classes(classNames or session.DEFAULT_CLASSES, classColors)
            nSlices = volumeNode.GetImageData().GetDimensions()[2] if volumeNode and volumeNode.GetImageData() else None
            fromFolder = bool(volumeNode and volumeNode.GetAttribute("SemSegLoop.fromFolder"))
            # Created here, with its first image, before the service takes over as its writer.
            with semsegloop.Project.create(folder, [c["name"] for c in classes],
                                           dims=session.resolve_dims(dims, nSlices, fromFolder),
                                           colors=[c["color"] for c in classes], preset=preset or None) as created:
                if volumeNode is not None:
                    imageId = created.add_image(mrml_bridge.volume_to_image(volumeNode), name=volumeNode.GetName())
                    self._tagVolume(volumeNode, imageId, folder)
            self._openProject(folder)
        if volumeNode is not None:
            self.addVolume(volumeNode)
        return self.project

    def _openProject(self, folder) -> None:
        from semsegloop.slicer import dependencies as deps
        self.project = semsegloop.Project.open(folder, read_only=True)
        engine = _SharedEngine.get()
        engine.open(folder)
        if not deps.missing_requirements():
            engine.start()  # torch imports while the person paints

    def _refreshProject(self) -> None:
        """Read the project again after the service changed it (a round, an image, classes)."""
        if self.project is not None:
            self.project = semsegloop.Project.open(self.project.path, read_only=True)

    def _requireProject(self):
        if self.project is None:
            raise semsegloop.ProjectError(_("Open or create a project first (Input section)."))
        return self.project

    def projectSummary(self) -> str:
        if self.project is None:
            return _("No project open.")
        p = self.project
        return _("{name}: {dims}D, {n} image(s), round {round}").format(
            name=p.path.name, dims=p.dims, n=len(p.image_ids), round=p.round)

    def projectDims(self):
        return self.project.dims if self.project is not None else None

    def availablePresets(self, dims=None) -> dict:
        """{preset name: description} of the network presets, for ``dims`` if given."""
        from semsegloop.learn.networks import list_presets
        return {name: preset.get("description", "") for name, preset in list_presets().items()
                if dims is None or preset["dims"] == dims}

    def defaultPreset(self) -> str:
        return self.project.preset if self.project is not None else ""

    def loadImageFolder(self, folder, name=None):
        """Load a folder of same-size 2D images (natural order, grey or RGB) as one stack volume."""
        from semsegloop.data import imageio
        from semsegloop.slicer import mrml_bridge
        if session.is_unset_path(folder):
            raise semsegloop.ImageReadError(_("Choose a folder of 2D images first."))
        image = imageio.read_image(folder, dims=2)  # names the odd file if sizes differ
        volume = mrml_bridge.image_to_volume_node(slicer.mrmlScene, image, name or image.name)
        volume.SetAttribute("SemSegLoop.fromFolder", str(folder))
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        return volume

    def addVolume(self, volumeNode) -> str:
        """Add a scene volume to the project (the service copies its voxels); returns its image id.
        While a round trains this waits only for the copy, not for the round."""
        from semsegloop.slicer import mrml_bridge
        project = self._requireProject()
        imageId = self.imageIdForVolume(volumeNode)
        if imageId is not None:
            return imageId
        image = mrml_bridge.volume_to_image(volumeNode)
        result = _SharedEngine.get().quick("add_image", send=lambda c: c.add_image(image, name=volumeNode.GetName()))
        self._tagVolume(volumeNode, result["image_id"], project.path)
        self._refreshProject()
        return result["image_id"]

    @staticmethod
    def _tagVolume(volumeNode, imageId, folder) -> None:
        volumeNode.SetAttribute(IMAGE_ID_ATTRIBUTE, imageId)
        volumeNode.SetAttribute(PROJECT_ATTRIBUTE, str(pathlib.Path(folder).resolve()))

    def imageIdForVolume(self, volumeNode):
        if volumeNode is None or self.project is None:
            return None
        imageId = volumeNode.GetAttribute(IMAGE_ID_ATTRIBUTE)
        sameProject = volumeNode.GetAttribute(PROJECT_ATTRIBUTE) == str(self.project.path.resolve())
        return imageId if sameProject and imageId in self.project.image_ids else None

    def volumeForImage(self, imageId):
        for volume in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if self.imageIdForVolume(volume) == imageId:
                return volume
        return None

    def loadProjectIntoScene(self) -> list:
        """Bring every project image (and its labels) into the scene unless already there."""
        from semsegloop.slicer import mrml_bridge
        project = self._requireProject()
        volumes = []
        for imageId in project.image_ids:
            volume = self.volumeForImage(imageId)
            if volume is None:
                volume = mrml_bridge.image_to_volume_node(slicer.mrmlScene, project.image(imageId),
                                                          project.image_info(imageId)["name"])
                self._tagVolume(volume, imageId, project.path)
                seg = self.labelsSegmentation(volume)
                mrml_bridge.labels_to_segmentation(project.labels(imageId), seg,
                                                   mrml_bridge.ensure_class_segments(seg, project.classes), volume)
            volumes.append(volume)
        return volumes

    # ---------------------------------------------------------------- classes and labels

    def setClasses(self, names, colors, volumeNode=None, removed=()) -> None:
        """Rename, recolour or add classes (``names``/``colors`` in label order) in the project and
        the labels segmentations; ``removed`` names classes deleted, whose segments (and strokes)
        are removed too. Segments keep their identity through tags, so renaming keeps strokes."""
        from semsegloop.slicer import mrml_bridge
        classes = session.make_classes(names, colors)
        hasLabels = bool(self.project is not None and self.project.labeled_image_ids())
        old = self.project.class_names if self.project is not None else list(names) + list(removed)
        session.check_class_edit(old, [c["name"] for c in classes], hasLabels)
        if self.busyJob() is not None:
            raise semsegloop.TrainingError(_("Wait for the running job to finish before changing classes."))
        if self.project is not None:
            _SharedEngine.get().quick("set_classes", classes=classes)
            self._refreshProject()
        volumes = [self.volumeForImage(i) for i in self.project.image_ids] if self.project is not None else []
        for volume in {v for v in volumes + [volumeNode] if v is not None}:
            seg = self.labelsSegmentation(volume)
            segmentation = seg.GetSegmentation()
            for sid in [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]:
                tag = vtk.reference("")
                if segmentation.GetSegment(sid).GetTag(mrml_bridge.CLASS_TAG, tag) and tag.get() in removed:
                    segmentation.RemoveSegment(sid)
            self.labelsSegmentation(volume, classes)

    def labelsSegmentation(self, volumeNode, classes=None):
        """The "<volume> labels" segmentation of a volume, created if needed, with one segment per
        class (label k = classes[k-1]) and the volume as its reference geometry."""
        from semsegloop.slicer import mrml_bridge
        seg = volumeNode.GetNodeReference(LABELS_REFERENCE_ROLE)
        if seg is None:
            seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", session.labels_name(volumeNode.GetName()))
            seg.CreateDefaultDisplayNodes()
            seg.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            volumeNode.SetNodeReferenceID(LABELS_REFERENCE_ROLE, seg.GetID())
        classes = classes or (self.project.classes if self.project is not None else None)
        if classes:
            mrml_bridge.ensure_class_segments(seg, classes)
        return seg

    def labelsArray(self, volumeNode):
        """The painted labels of a volume as a (S, Y, X) uint8 array (0 = unlabeled)."""
        from semsegloop.slicer import mrml_bridge
        project = self._requireProject()
        seg = self.labelsSegmentation(volumeNode)
        mrml_bridge.check_geometry_matches(seg, volumeNode)
        return mrml_bridge.segmentation_to_labels(seg, mrml_bridge.ensure_class_segments(seg, project.classes), volumeNode)

    def snapshotLabels(self, imageIds=None) -> dict:
        """{image id: labels} of the project volumes in the scene (all, or ``imageIds``), read now."""
        project = self._requireProject()
        snapshot = {}
        for imageId in project.image_ids if imageIds is None else imageIds:
            volume = self.volumeForImage(imageId)
            if volume is not None and volume.GetNodeReference(LABELS_REFERENCE_ROLE) is not None:
                snapshot[imageId] = self.labelsArray(volume)
        return snapshot

    # ---------------------------------------------------------------- dependencies

    def ensureDependencies(self, askConfirmation=True) -> bool:
        """Install what is missing after asking once; False if the person declined. Main thread
        only (pip from a worker thread crashes Slicer 5.12). Never installs at import time."""
        from semsegloop.slicer import dependencies as deps
        deps.ensure_compatible()
        missing = deps.missing_requirements()
        if not missing:
            return True
        listing = "\n".join(f"- {req}" for req in missing)
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("SemSegLoop needs these Python packages, which will be downloaded and installed "
                  "into Slicer (this can take several minutes):\n\n{listing}").format(listing=listing),
                _("SemSegLoop - install Python packages")):
            return False
        if any(req.installer == "pytorch" for req in missing):
            try:
                import PyTorchUtils
            except ImportError:
                raise semsegloop.TrainingError(_("PyTorch is needed: install the 'PyTorch' extension from the "
                                                 "Extensions Manager, restart Slicer and press Train again.")) from None
            torchSpec = next(req.specifier for req in missing if req.installer == "pytorch")
            # The person agreed above (or asked for no questions): PyTorch Utils must not ask again.
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                             torchVersionRequirement=torchSpec) is None:
                return False
        rest = [req for req in deps.missing_requirements() if req.installer == "pip"]
        if rest:
            constraints = deps.write_constraints(pathlib.Path(slicer.app.temporaryPath) / "SemSegLoop-constraints.txt")
            try:
                import slicer.packaging as packaging
            except ImportError:
                packaging = None
            if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer 5.12+
                packaging.pip_ensure([str(req) for req in rest], constraints=str(constraints),
                                     prompt_install=False, requester="SemSegLoop")
            else:
                slicer.util.pip_install(deps.pip_args_for(rest, constraints))
        stillMissing = deps.missing_requirements()
        if stillMissing and not slicer.app.testingEnabled():
            raise semsegloop.TrainingError(_("These packages are still missing after installation: {names}. "
                                             "Restart Slicer and try again.").format(
                names=", ".join(str(r) for r in stillMissing)))
        if _SharedEngine.session is not None and _SharedEngine.session.client is not None:
            _SharedEngine.session.restart()  # a fresh engine imports the new packages
        return True

    # ---------------------------------------------------------------- engine jobs

    def busyJob(self):
        """The running job ("train", "predict", ...) or None; a job is over once its final
        event has been read."""
        engine = _SharedEngine.session
        return engine.busy_job() if engine is not None else None

    def cancel(self) -> None:
        """Stop the running job; if the engine has not ended it 2 s later, it is killed (the last
        saved model and the labels are kept) and the next job starts a new engine."""
        engine = _SharedEngine.session
        if engine is None or engine.busy_job() is None:
            return
        engine.stop()
        qt.QTimer.singleShot(int(engine.stop_grace_s * 1000) + 100, engine.tick)

    def addJobObservers(self, onProgress=None, onFinished=None) -> None:
        """``onProgress(TrainProgress)`` per step, ``onFinished(job, outcome)`` per finished job."""
        if onProgress is not None:
            _SharedEngine.progressObservers.append(onProgress)
        if onFinished is not None:
            _SharedEngine.finishedObservers.append(onFinished)

    def removeJobObservers(self, onProgress=None, onFinished=None) -> None:
        for observers, fn in ((_SharedEngine.progressObservers, onProgress), (_SharedEngine.finishedObservers, onFinished)):
            if fn in observers:
                observers.remove(fn)

    def onSceneClose(self) -> None:
        """Stop the running job (its results will not be imported into the new scene) and drop
        the project view, whose images are scene nodes; the engine stays warm."""
        if _SharedEngine.session is not None:
            _SharedEngine.session.scene_closed()
        _SharedEngine.plot = None
        self.project = None

    def shutdown(self) -> None:
        """End the engine process (the application closes)."""
        if _SharedEngine.session is not None:
            _SharedEngine.session.close()

    def pollEvents(self) -> list:
        """[(job, outcome)] of the jobs finished since the last call. In the application events
        arrive by themselves; a script without an event loop may call this to receive them."""
        engine = _SharedEngine.session
        if engine is not None and engine.client is not None and engine.client.transport is not None:
            engine.client.poll(0.0)
        finished, _SharedEngine.finished = _SharedEngine.finished, []
        return finished

    def waitForCompletion(self, timeout=None):
        """Block until the running job ends; returns its outcome, raises its error."""
        return _SharedEngine.session.wait(timeout) if _SharedEngine.session is not None else None

    def _run(self, kind, send, onFinished, wait, progressCallback=None):
        def onProgress(progress):
            if kind == "train":
                self._lossPlot().add(progress)
            for observer in list(_SharedEngine.progressObservers):
                observer(progress)
            if progressCallback is not None:
                progressCallback(progress)

        engine = _SharedEngine.get()
        engine.run(kind, send, on_finished=onFinished, on_progress=onProgress)
        return engine.wait() if wait else None

    # ---------------------------------------------------------------- training

    def train(self, volumeNodes=None, timeBudgetS=60, steps=0, device="auto", preset=None, wait=False,
              progressCallback=None):
        """Train one round on the labels painted so far in every project volume of the scene.

        The labels are read now (a snapshot, handed to the engine as files): strokes painted while
        training count from the next round. ``volumeNodes`` are added to the project first. With
        ``wait=True`` returns the TrainResult (``progressCallback(TrainProgress)`` on this thread).
        """
        from semsegloop.slicer import engine
        project = self._requireProject()
        if self.busyJob() is not None:
            raise semsegloop.TrainingError(_("SemSegLoop is already running a {job} job; press Stop or wait.").format(
                job=self.busyJob()))
        for volume in volumeNodes or []:
            self.addVolume(volume)
        project = self._requireProject()
        snapshot = self.snapshotLabels()
        stored = [project.labels(i) for i in project.labeled_image_ids() if i not in snapshot]
        session.check_ready_to_train(list(snapshot.values()) + stored, project.class_names)
        kwargs = session.training_kwargs(timeBudgetS, steps, device, preset)
        self._lossPlot().start_round()

        def finished(job):
            self._refreshProject()
            return engine.train_result(job)
        return self._run("train", lambda client: client.train(labels=snapshot, **kwargs), finished, wait,
                         progressCallback)

    def _lossPlot(self):
        """The scene's live loss curve (table + plot series + chart), created once per scene."""
        from semsegloop.slicer.plots import LossPlot
        if _SharedEngine.plot is None or not _SharedEngine.plot.alive:
            _SharedEngine.plot = LossPlot(slicer.mrmlScene)
        return _SharedEngine.plot

    def showLossPlot(self) -> None:
        chart = self._lossPlot().chart
        if slicer.app.layoutManager() is not None:
            slicer.modules.plots.logic().ShowChartInLayout(chart)

    # ---------------------------------------------------------------- prediction and corrections

    def predict(self, volumeNode, showUncertainty=False, wait=False):
        """Predict one volume with the latest model; its segmentation "SemSegLoop round N" is
        added to the scene (an earlier one of that name is kept). Returns it with ``wait=True``."""
        outcome = self._predict([volumeNode], showUncertainty, wait)
        return outcome.get(volumeNode.GetID()) if wait and outcome else None

    def predictAll(self, showUncertainty=False, wait=False):
        """Predict every project image; segmentations are added for those in the scene.
        Returns {volume node ID: segmentation node} with ``wait=True``."""
        return self._predict(None, showUncertainty, wait)

    def _predict(self, volumeNodes, showUncertainty, wait):
        from semsegloop.slicer import engine
        project = self._requireProject()
        if project.round == 0:
            raise semsegloop.CheckpointError(_("There is no model yet: paint at least two classes and press Train."))
        if volumeNodes is not None and None in volumeNodes:
            raise semsegloop.ImageReadError(_("Select the image to predict in Input."))
        imageIds = None if volumeNodes is None else [self.addVolume(v) for v in volumeNodes]
        # Strokes win over the network in the prediction, so it must see the current ones.
        labels = self.snapshotLabels(imageIds)
        client = _SharedEngine.get().client
        return self._run("predict", lambda c: c.predict(imageIds, uncertainty=showUncertainty, labels=labels),
                         lambda job: self._showPredictions(engine.read_predictions(client, job), job.result.get("round")),
                         wait)

    def _showPredictions(self, results, roundIndex) -> dict:
        """Add one segmentation (and the uncertainty overlay when computed) per predicted volume."""
        from semsegloop.slicer import predictions
        self._refreshProject()
        project = self.project
        shown = {}
        multiple = len(project.image_ids) > 1
        for imageId, (labels, entropy) in (results or {}).items():
            volume = self.volumeForImage(imageId)
            if volume is None:
                continue
            name = session.prediction_name(roundIndex or project.round, volume.GetName() if multiple else None)
            shown[volume.GetID()] = predictions.import_prediction(slicer.mrmlScene, labels, project.classes, volume, name)
            if entropy is not None:
                uncertainty = predictions.import_uncertainty(
                    slicer.mrmlScene, entropy, volume, session.uncertainty_name(roundIndex or project.round, volume.GetName()))
                slicer.util.setSliceViewerLayers(foreground=uncertainty, foregroundOpacity=0.4)
        return shown

    def acceptCorrections(self, volumeNode, predictionSegmentation, classes=None) -> dict:
        """Copy the prediction (as it is now: erase parts of it first to keep them out) into the
        volume's labels where nothing is painted yet. ``classes``: class values 1..K to copy
        (default all). Returns {class value: voxels added}. The caller saves undo state."""
        from semsegloop.slicer import mrml_bridge
        project = self._requireProject()
        if volumeNode is None or predictionSegmentation is None:
            raise semsegloop.LabelError(_("Select the image and its prediction segmentation first."))
        mrml_bridge.check_geometry_matches(predictionSegmentation, volumeNode)
        predicted = mrml_bridge.segmentation_to_labels(
            predictionSegmentation, mrml_bridge.ensure_class_segments(predictionSegmentation, project.classes), volumeNode)
        seg = self.labelsSegmentation(volumeNode)
        return mrml_bridge.merge_corrections(seg, mrml_bridge.ensure_class_segments(seg, project.classes),
                                             volumeNode, predicted, classes=classes)

    def refine(self, volumeNode, wait=False):
        """Correct the latest prediction of ``volumeNode`` with its current labels (strokes painted
        since, old ones included), without training; the result is shown in (and, with
        ``wait=True``, returned as) the "SemSegLoop round N refined" segmentation, updated in place
        by every Refine. The strokes join the labels of the next round."""
        from semsegloop.slicer import corrections
        project = self._requireProject()
        if volumeNode is None:
            raise semsegloop.ImageReadError(_("Select the image to refine in Input."))
        imageId = self.addVolume(volumeNode)
        strokes = self.snapshotLabels([imageId]).get(imageId)
        if strokes is None or not strokes.any():
            raise semsegloop.LabelError(_("Paint correction strokes on the image first, then press Refine."))
        client = _SharedEngine.get().client

        def finished(job):
            from semsegloop.data import imageio
            self._refreshProject()
            labels, _geometry = imageio.read_labels(client.output_path(job.result["output"]))
            multiple = len(self.project.image_ids) > 1
            name = corrections.refined_name(job.result["round"], volumeNode.GetName() if multiple else None)
            return corrections.show_refined(slicer.mrmlScene, labels, project.classes, volumeNode, name)
        return self._run("refine", lambda c: c.refine(imageId, strokes), finished, wait)

    def setPostprocessing(self, settings) -> dict:
        """Store the per-class clean-up of the next predictions in the project; returns it."""
        self._requireProject()
        result = _SharedEngine.get().quick("set_postprocessing", settings=settings)
        self._refreshProject()
        return result["postprocessing"]

    def suggest(self, n=3, wait=False):
        """The ``n`` images or slices the latest model is least sure about ([{image_id, slice,
        score}], most uncertain first; with ``wait=True``)."""
        project = self._requireProject()
        if project.round == 0:
            raise semsegloop.CheckpointError(_("There is no model yet: paint at least two classes and press Train."))
        return self._run("suggest", lambda c: c.request("suggest", n=n), lambda job: job.result["suggestions"], wait)

    def postprocessingSettings(self):
        """The project's stored post-processing ({"k": options}), or None without a project."""
        return self.project.postprocessing if self.project is not None else None

    def suggestionTexts(self, suggestions) -> list:
        from semsegloop.slicer import corrections
        project = self._requireProject()
        return [corrections.suggestion_text(s, project.image_info(s["image_id"])["name"], project.dims)
                for s in suggestions]

    def showSuggestion(self, suggestion):
        """Bring the suggested image into the slice views, centred on the suggested slice."""
        from semsegloop.slicer import corrections
        volume = self.volumeForImage(suggestion["image_id"])
        if volume is None:
            self.loadProjectIntoScene()
            volume = self.volumeForImage(suggestion["image_id"])
        if volume is None:
            raise semsegloop.ImageReadError(_("Image '{id}' could not be shown.").format(id=suggestion["image_id"]))
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        shape = tuple(self.project.image_info(suggestion["image_id"])["shape"][:3])
        corrections.jump_to_suggestion(slicer.mrmlScene, volume, suggestion, shape)
        return volume

    # ---------------------------------------------------------------- finish

    def exportPredictions(self, folder, fmt="nrrd", wait=False):
        """Write the latest prediction of every image to ``folder`` (NRRD or TIFF); returns paths."""
        self._requireProject()
        if session.is_unset_path(folder):
            raise semsegloop.ProjectError(_("Choose an export folder first (Finish section)."))
        return self._run("export", lambda c: c.request("export", out_dir=str(pathlib.Path(folder).resolve()), format=fmt),
                         lambda job: [pathlib.Path(p) for p in job.result.get("outputs", [])], wait)

    def classFractions(self, folder=None, wait=False):
        """Per image and class pixel counts, fractions and areas/volumes as a table node (and
        class_fractions.csv in ``folder`` if given)."""
        self._requireProject()
        csvPath = None if session.is_unset_path(folder) else str(pathlib.Path(folder).resolve() / "class_fractions.csv")
        return self._run("fractions", lambda c: c.request("fractions", csv_path=csvPath),
                         lambda job: self.tableFromRows("SemSegLoop class fractions", job.result.get("rows", [])), wait)

    def compareWithReference(self, volumeNode, referenceSegmentation, wait=False):
        """Dice, Jaccard, HD95 and mean surface distance of the latest prediction of a volume
        against a reference segmentation whose segments are named like the classes."""
        from semsegloop.slicer import mrml_bridge
        project = self._requireProject()
        if referenceSegmentation is None:
            raise semsegloop.LabelError(_("Select a reference segmentation first."))
        imageId = self.addVolume(volumeNode)
        segmentation = referenceSegmentation.GetSegmentation()
        ids, values = [], []
        for k, name in enumerate(project.class_names, 1):
            segmentId = segmentation.GetSegmentIdBySegmentName(name)
            if segmentId:
                ids.append(segmentId)
                values.append(k)
        if not ids:
            raise semsegloop.LabelError(_("Reference segmentation '{ref}' has no segment named like a class ({names}).").format(
                ref=referenceSegmentation.GetName(), names=", ".join(project.class_names)))
        mrml_bridge.check_geometry_matches(referenceSegmentation, volumeNode)
        reference = session.remap_labels(mrml_bridge.segmentation_to_labels(referenceSegmentation, ids, volumeNode), values)
        names = {imageId: volumeNode.GetName()}
        # Classes the reference has no segment for are not annotated there: no score for them.
        scored = [project.class_names[k - 1] for k in values]
        return self._run("evaluate", lambda c: c.evaluate({imageId: reference}),
                         lambda job: self.tableFromRows("SemSegLoop comparison",
                                                        session.metric_rows(job.result.get("report", {}), names, scored)), wait)

    def tableFromRows(self, name, rows):
        """A table node with one column per key (numbers as doubles, the rest as text)."""
        from semsegloop.slicer.plots import table_from_rows
        return table_from_rows(slicer.mrmlScene, name, rows)

    def showTable(self, tableNode) -> None:
        from semsegloop.slicer.plots import select_table
        if slicer.app.layoutManager() is None:
            return
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        if select_table(slicer.mrmlScene, tableNode):
            slicer.app.applicationLogic().PropagateTableSelection()


#
# SemSegLoopTest
#


class SemSegLoopTest(ScriptedLoadableModuleTest):
    """The whole loop on a synthetic image, blocking (``wait=True``): ``--testing`` mode exits as
    soon as the test code returns, so nothing here may rely on the event loop."""

    def setUp(self):
        SemSegLoopLogic().shutdown()  # the previous test's engine owns the folder removed next
        slicer.mrmlScene.Clear()
        import shutil
        self.projectFolder = pathlib.Path(slicer.app.temporaryPath) / "SemSegLoopSelfTest"
        shutil.rmtree(self.projectFolder, ignore_errors=True)

    def tearDown(self):
        SemSegLoopLogic().shutdown()

    def runTest(self):
        self.setUp()
        self.test_SemSegLoop_bad_input()
        self.tearDown()
        reason = self._skipReason()
        if reason:  # "Reload and Test" calls this directly: a SkipTest here would be an error
            logging.warning(reason)
            return
        self.setUp()
        self.test_SemSegLoop_full_loop()
        self.tearDown()

    @staticmethod
    def _skipReason():
        import importlib.util
        missing = session.missing_training_packages(importlib.util.find_spec)
        if missing:
            return (f"SemSegLoop training self-test skipped: {', '.join(missing)} not installed in "
                    f"Slicer's Python (install the PyTorch extension and SemSegLoop's requirements)")
        return None

    def _twoRegionVolume(self):
        import numpy as np
        rng = np.random.default_rng(0)
        image = np.full((1, 64, 64), 40.0)
        image[:, :, 32:] = 200.0
        image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
        return slicer.util.addVolumeFromArray(image, name="SemSegLoop test image")

    def _paint(self, logic, volume, strokes):
        import numpy as np
        seg = logic.labelsSegmentation(volume)
        from semsegloop.slicer import mrml_bridge
        ids = mrml_bridge.ensure_class_segments(seg, logic.project.classes)
        for segmentId, (rows, cols) in zip(ids, strokes):
            mask = np.zeros((1, 64, 64), np.uint8)
            mask[0, rows, cols] = 1
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, segmentId, volume)
        return seg, ids

    def test_SemSegLoop_full_loop(self):
        reason = self._skipReason()
        if reason:  # extension build machines have neither torch nor MONAI
            self.skipTest(reason)
        import numpy as np
        self.delayDisplay("Full loop: paint, train, predict, correct, train again")
        volume = self._twoRegionVolume()
        logic = SemSegLoopLogic()
        project = logic.openOrCreateProject(self.projectFolder, ["dark", "bright"], dims="auto", volumeNode=volume)
        self.assertEqual(project.dims, 2)
        self._paint(logic, volume, [(slice(8, 56), slice(12, 14)), (slice(8, 56), slice(48, 50))])
        painted = logic.labelsArray(volume)
        self.assertEqual(painted.shape, (1, 64, 64))
        self.assertEqual(set(np.unique(painted)), {0, 1, 2})

        result = logic.train(steps=3, device="cpu", wait=True)
        self.assertEqual((result.round, result.steps, result.cancelled), (1, 3, False))

        prediction = logic.predict(volume, showUncertainty=True, wait=True)
        self.assertEqual(prediction.GetName(), "SemSegLoop round 1")
        segmentation = prediction.GetSegmentation()
        self.assertEqual([segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())],
                         ["dark", "bright"])
        self.assertEqual(tuple(np.round(np.array(segmentation.GetNthSegment(0).GetColor()) * 255)),
                         tuple(project.classes[0]["color"]))
        from semsegloop.slicer import mrml_bridge
        predicted = mrml_bridge.segmentation_to_labels(prediction, mrml_bridge.ensure_class_segments(prediction, project.classes), volume)
        self.assertTrue(set(np.unique(predicted)) <= {1, 2})
        np.testing.assert_array_equal(predicted[painted > 0], painted[painted > 0])  # strokes win

        refined = logic.refine(volume, wait=True)   # through the engine service's refine op
        self.assertEqual(refined.GetName(), "SemSegLoop round 1 refined")
        refinedLabels = mrml_bridge.segmentation_to_labels(
            refined, mrml_bridge.ensure_class_segments(refined, project.classes), volume)
        np.testing.assert_array_equal(refinedLabels[painted > 0], painted[painted > 0])
        self.assertEqual(logic.suggest(3, wait=True), [])   # the only image is painted

        added = logic.acceptCorrections(volume, prediction)
        self.assertEqual(sum(added.values()), int((painted == 0).sum()))
        corrected = logic.labelsArray(volume)
        np.testing.assert_array_equal(corrected[painted > 0], painted[painted > 0])
        self.assertEqual(int((corrected == 0).sum()), 0)

        result = logic.train(steps=3, device="cpu", wait=True)
        self.assertEqual(result.round, 2)
        table = logic.classFractions(self.projectFolder, wait=True)
        self.assertEqual(table.GetNumberOfRows(), 2)
        self.assertTrue((self.projectFolder / "class_fractions.csv").is_file())
        self.delayDisplay("Full loop passed")

    def test_SemSegLoop_bad_input(self):
        self.delayDisplay("Bad input gets clear errors and keeps the labels")
        volume = self._twoRegionVolume()
        logic = SemSegLoopLogic()
        with self.assertRaises(semsegloop.ProjectError):
            logic.openOrCreateProject("", ["a", "b"], volumeNode=volume)
        logic.openOrCreateProject(self.projectFolder, ["dark", "bright"], volumeNode=volume)
        with self.assertRaises(semsegloop.LabelError):
            logic.train(steps=1, device="cpu", wait=True)  # nothing painted
        self._paint(logic, volume, [(slice(8, 56), slice(12, 14))])
        with self.assertRaisesRegex(semsegloop.LabelError, "only 'dark' is painted"):
            logic.train(steps=1, device="cpu", wait=True)
        with self.assertRaises(semsegloop.CheckpointError):
            logic.predict(volume, wait=True)  # no model yet
        self.assertEqual(int((logic.labelsArray(volume) == 1).sum()), 96)
        self.assertIsNone(logic.busyJob())
        self.delayDisplay("Bad input passed")
